"""`onegpu report JOB`: one self-contained HTML page of a job, checked in a real headless browser (Chromium):
it loads without console errors and every chart draws; a job still running reports what it has so far; a part
not recorded says so; an unknown job is one line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from job_records import pipeline_trace, write_job
from typer.testing import CliRunner

from onegpu.cli import app
from onegpu.pool.ledger import open_ledger
from onegpu.report.html import render, write_report
from onegpu.report.job_charts import event_kind, runs
from onegpu.report.job_record import read_record
from onegpu.report.plan_plot import short_name

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
DIAGNOSIS = "rank 1 is behind: all_reduce #41 on rank 0, #40 on rank 1"


@pytest.fixture(scope="module")
def planned():
    """A pipelined plan with the planner's prediction, runners-up and rejections."""
    from onegpu.planner.search import find_plan

    return find_plan("gpt2", global_batch_size=16, seq_len=1024, cluster="a100-80gb", pp=2)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, planned):
    """A finished 2-worker job's record in a home of its own, with its two leases in that home's ledger."""
    home = tmp_path_factory.mktemp("home")
    directory = write_job(home, "ada-0f1e2d3c", plan=planned, steps=40)
    ledger = open_ledger(url=None, home=home, ttl_s=30)
    ledger.acquire(job="ada-0f1e2d3c", devices=2, pool_devices=[0, 1, 2, 3], wait=False, user="ada")
    ledger.release(job="ada-0f1e2d3c")
    return directory


@pytest.fixture(scope="module")
def full_page(finished, planned):
    """The report of that job with every part there, a measured pipeline timeline and a diagnosis added (the
    timeline and doctor parts of issue 18 record those)."""
    record = read_record(finished)
    assert record.plan == planned and record.plan.predicted == planned.predicted  # plan.json keeps the prediction
    assert [a.predicted for a in record.plan.alternatives] == [a.predicted for a in planned.alternatives]
    record = replace(record, timeline=pipeline_trace(), diagnosis=DIAGNOSIS, missing={})
    return write_report(record, finished / "full.html")


def browse(page: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page``: its DOM after the scripts ran on stdout, its console on stderr."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("ONEGPU_REQUIRE_BROWSER"):
            pytest.fail(f"ONEGPU_REQUIRE_BROWSER is set but there is no Chromium at {CHROMIUM}")
        pytest.skip("no Chromium (apt-get install chromium); CI sets ONEGPU_REQUIRE_BROWSER")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra]
        return subprocess.run([*command, page.as_uri()], capture_output=True, text=True, timeout=90)


def test_the_page_loads_in_a_browser_and_draws_every_chart(full_page, planned):
    shown = browse(full_page, "--dump-dom")
    assert shown.returncode == 0, shown.stderr[-2000:]
    console = [line for line in shown.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == []
    body = re.search(r'<body data-charts-drawn="(\d+)" data-charts="(\d+)"', shown.stdout)
    assert body, "the page's script did not run"
    # loss, throughput, memory per worker, the plan and its runners-up, the pipeline timeline
    assert body.groups() == ("5", "5")
    for text in ("onegpu job ada-0f1e2d3c", "ended", "40 steps recorded", "peak memory per worker (GiB)",
                 f"{short_name(planned)}  [chosen]", "Why: fastest of", "why it lost", "runner-up", "rejected",
                 "measured 21.0%, predicted 20.0%", "pipeline timeline (measured)", "rank 1 (stage 1)",
                 "2 lease intervals", DIAGNOSIS):  # fmt: skip
        assert text in shown.stdout, text


def test_the_page_is_self_contained(full_page):
    text = full_page.read_text()
    assert text.count("<svg") == 5 and "<img" not in text
    assert not re.search(r'(src|href)="(https?:|//|[^"#])', text)  # no CDN, no file beside it: links are #ids
    assert len(set(re.findall(r' id="([^"]+)"', text))) == len(re.findall(r' id="([^"]+)"', text))


def test_the_leases_are_read_from_the_ledger_of_the_jobs_home(finished, full_page):
    assert [(i.device, i.user) for i in read_record(finished).leases] == [(0, "ada"), (1, "ada")]
    page = full_page.read_text()
    assert "<th>device-minutes</th>" in page and "<td>ada</td>" in page


def test_a_running_job_reports_what_it_has_so_far(tmp_path):
    directory = write_job(tmp_path, "bob-12345678", plan=None, steps=3, ended=False)
    result = CliRunner().invoke(app, ["report", str(directory)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(directory / "report.html")
    page = (directory / "report.html").read_text()
    assert "running</span>: what it recorded so far" in page and "3 steps recorded" in page
    assert "no plan recorded yet" in page
    timeline = page[page.index('id="timeline"') : page.index('id="devices"')]
    assert "not recorded" in timeline  # a part nobody recorded (or this onegpu cannot read) is said, not a crash
    assert "no lease of this job" in page or "ledger could not be read" in page
    assert 'id="doctor"' in page


def test_a_job_without_steps_yet_still_has_a_page(tmp_path):
    directory = write_job(tmp_path, "eve-00000000", plan=None, steps=0, ended=False)
    page = render(read_record(directory))
    assert "no step recorded yet" in page and "no memory recorded yet" in page and page.count("<svg") == 0


def test_a_script_that_prepares_again_has_one_line_per_run():
    rows = [{"step": s, "loss_metrics/global_avg_loss": 1.0 / s} for s in (1, 2, 3, 1, 2)]
    assert runs(rows, "loss_metrics/global_avg_loss") == [([1, 2, 3], [1.0, 0.5, 1 / 3]), ([1, 2], [1.0, 0.5])]


def test_timeline_events_are_told_apart_by_kind():
    kinds = {e["name"]: event_kind(e) for e in pipeline_trace(ranks=1, microbatches=1)["traceEvents"] if "cat" in e}
    assert kinds == {"F0": "forward", "send F0": "send / recv", "B0": "backward"}
    assert event_kind({"name": "post recv B3", "cat": "recv backward"}) == "send / recv"
    assert event_kind({"name": "W2", "cat": "backward weight"}) == "backward weight"
    assert event_kind({"name": "L0", "cat": "loss"}) == "loss, other"


def test_an_unknown_job_is_one_line():
    result = CliRunner().invoke(app, ["report", "nobody-00000000"])
    assert result.exit_code == 1
    assert result.stderr.startswith("onegpu: no job 'nobody-00000000' in ") and "onegpu run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_output_in_a_missing_directory_is_one_line_and_writes_nothing(tmp_path):
    directory = write_job(tmp_path, "kim-abcdef01", plan=None, steps=2)
    result = CliRunner().invoke(app, ["report", str(directory), "-o", str(tmp_path / "nowhere" / "r.html")])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "does not exist" in result.stderr
    assert not (tmp_path / "nowhere").exists() and not list(directory.glob("*.html"))
