"""``onegpu smi``: each running job's memory and utilization over the last minutes, and ``--watch``."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from typer.testing import CliRunner

from onegpu.cli import app
from onegpu.cli.smi import sparkline
from onegpu.pool.config import load_pool
from onegpu.pool.lease import pool_ledger


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A pool of 4 CPU slots whose leases stay valid while a test looks at them."""
    (tmp_path / "pool.toml").write_text("cpu_slots = 4\nslot_memory_gb = 6\n")
    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path))
    monkeypatch.setenv("ONEGPU_LEASE_TTL", "600")
    return tmp_path


def reported(monkeypatch, *, job: str, devices: int, gigabytes: list[float], start: int = 0) -> None:
    """``job`` holds ``devices`` devices, each of which reported ``gigabytes[k]`` GB and utilization k / 7, ``k``
    tens of seconds ago counted back from now (the last value is the newest)."""
    records, now = pool_ledger(load_pool()), time.time()
    records.acquire(job=job, devices=devices, pool_devices=range(4))
    for k, value in enumerate(gigabytes):
        with monkeypatch.context() as clock:
            clock.setattr(time, "time", lambda k=k: now - 10 * (len(gigabytes) - 1 - k) - 1)
            for device in range(start, start + devices):
                records.report(job=job, device=device, memory_bytes=value * 1e9, utilization=k / 7)


def smi(*args: str):
    result = CliRunner().invoke(app, ["smi", *args])
    return result.exit_code, result.output


def test_a_sparkline_draws_values_from_the_lowest_bar_to_the_top_and_gaps_as_spaces():
    assert sparkline([0, 0.5, 1.0, None, 2.0], top=1.0) == "▁▅█ █"
    assert sparkline([0, 0], top=0) == "▁▁"


def test_smi_draws_each_running_jobs_memory_and_utilization_history(home, monkeypatch):
    reported(monkeypatch, job="train", devices=2, gigabytes=[1, 2, 3, 4, 5, 6, 7, 8])
    reported(monkeypatch, job="tune", devices=1, gigabytes=[2, 2], start=2)
    code, output = smi()
    assert code == 0, output
    lines = output.splitlines()
    train = lines.index(next(line for line in lines if line.strip().startswith("train ")))
    memory, utilization = lines[train + 1], lines[train + 2]
    assert memory == "      memory " + " " * 22 + "▂▃▄▅▆▇██  16.0 GB now, 16.0 GB at most"  # summed over its devices
    assert utilization == "      util   " + " " * 22 + "▁▂▃▄▅▆▇█  100% now"
    tune = lines.index(next(line for line in lines if line.strip().startswith("tune ")))
    assert lines[tune + 1].startswith("      memory " + " " * 28 + "██  2.0 GB now")


def test_smi_json_has_each_jobs_history(home, monkeypatch):
    reported(monkeypatch, job="train", devices=2, gigabytes=[1, 3])
    code, output = smi("--json")
    assert code == 0, output
    (job,) = json.loads(output)["jobs"]
    points = job["history"]
    assert [(p["memory_used_gb"], p["utilization"]) for p in points] == [(2.0, 0.0), (6.0, 0.143)]
    assert points[0]["time"] < points[1]["time"] <= time.time()


def test_watch_draws_again_every_interval(home, monkeypatch):
    reported(monkeypatch, job="train", devices=1, gigabytes=[1])
    code, output = smi("--watch", "--interval", "0.01", "--refreshes", "3")  # not a terminal: one table each
    assert code == 0 and output.count("onegpu smi at") == 3 and output.count("Virtual Device") == 3
    assert "--refreshes" not in smi("--help")[1]
    code, output = smi("--watch", "--json")
    assert code == 1 and output.count("\n") == 1 and "leave out --json" in output


@pytest.mark.slow
def test_watch_refreshes_in_place_on_a_terminal_and_ctrl_c_ends_it_quietly(home):
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "onegpu", "smi", "--watch", "--interval", "0.2"], cwd=ROOT,
                               stdin=follower, stdout=follower, stderr=follower, env={**os.environ})  # fmt: skip
    os.close(follower)
    output, deadline = b"", time.time() + 60
    while output.count(b"onegpu smi at") < 2 and time.time() < deadline:  # drawn, then drawn again
        output += os.read(leader, 65536)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    try:
        while chunk := os.read(leader, 65536):
            output += chunk
    except OSError:
        pass
    os.close(leader)
    text = output.decode(errors="replace")
    assert text.count("onegpu smi at") >= 2 and "\x1b[" in text  # redrawn with the terminal's cursor moves
    assert "Traceback" not in text and "Aborted" not in text and "KeyboardInterrupt" not in text
