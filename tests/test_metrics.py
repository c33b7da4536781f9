"""Every job of `onegpu run` keeps its record: job.json, plan.json, and one row of metrics per optimizer step
(torchtitan's names) in metrics.jsonl and TensorBoard event files, with a progress line on the terminal."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from onegpu.launch.job_record import end_record, has_ended, read_record, record_resize, start_record
from onegpu.launch.resizing import ACCEPTED, REQUEST, job_directory
from onegpu.plan import Plan, Prediction
from onegpu.report.records import read_job, read_metrics, read_plan
from onegpu.runtime.metrics_log import MetricsLog, scalars
from onegpu.runtime.progress_line import ProgressLine, progress_text
from onegpu.runtime.step_metrics import GIB, flops_of, metrics_row, tokens_per_row

FIGURES = ("throughput(tps)", "time_metrics/end_to_end(s)", "time_metrics/data_loading(s)",
           "time_metrics/data_loading(%)", "memory/max_active(GiB)", "memory/peak_per_worker(GiB)")  # fmt: skip


def row(**changes):
    figures = dict(step=3, at=100.0, losses=[2.0, 4.0], grad_norm=0.5, items=4096, tokens=True, seconds=2.0,
                   loading_s=0.5, world_size=2, peaks=[GIB, 3 * GIB])  # fmt: skip
    return metrics_row(**{**figures, **changes})


def test_a_row_has_torchtitans_names():
    figures = row()
    assert figures["step"] == 3 and figures["time"] == 100.0
    assert figures["loss_metrics/global_avg_loss"] == 3.0  # the mean over the step's accumulated calls
    assert figures["grad_norm"] == 0.5
    assert figures["throughput(tps)"] == 2048.0
    assert figures["time_metrics/end_to_end(s)"] == 2.0
    assert figures["time_metrics/data_loading(%)"] == 25.0
    assert figures["memory/max_active(GiB)"] == 3.0
    assert figures["memory/peak_per_worker(GiB)"] == [1.0, 3.0]
    assert "tflops" not in figures and "mfu(%)" not in figures  # no FLOPs known


def test_a_row_leaves_out_what_was_not_measured():
    figures = row(losses=[], grad_norm=None, tokens=False, items=8, peaks=[None, None])
    assert figures["throughput(sps)"] == 4.0 and "throughput(tps)" not in figures
    assert not {"loss_metrics/global_avg_loss", "grad_norm", "memory/max_active(GiB)"} & set(figures)


def test_tflops_and_mfu_come_from_the_plans_prediction():
    predicted = Prediction(step_time_s=2.0, tokens_per_s=1000.0, tflops_per_device=3.0, mfu=0.25,
                           memory_per_device_bytes=0, memory_breakdown={})  # fmt: skip
    plan = Plan(dp=2, predicted=predicted)
    per_token, peak = flops_of(plan)
    assert per_token == pytest.approx(3e12 * 2.0 * 2 / 2000) and peak == pytest.approx(12e12)
    figures = row(items=2000, seconds=4.0, flops_per_item=per_token, peak_flops=peak)
    assert figures["tflops"] == pytest.approx(1.5)  # the same work in twice the predicted time
    assert figures["mfu(%)"] == pytest.approx(12.5)
    assert flops_of(Plan(dp=2)) == (None, None)  # a hand-written plan: no MFU


def test_tokens_are_counted_from_token_ids():
    import torch

    ids = torch.zeros(4, 16, dtype=torch.long)
    assert tokens_per_row((), {"input_ids": ids, "labels": ids}) == 16
    assert tokens_per_row((ids, ids), {}) == 16  # nanoGPT's (idx, targets)
    assert tokens_per_row((torch.randn(4, 16), torch.randn(4, 1)), {}) is None  # features: samples


def meter_rows(model, steps, *, log=None):
    """The rows a StepMeter on ``model`` writes while ``steps`` (a list of lists of calls' inputs) train it."""
    import torch

    from onegpu.launch.process_group import Worker
    from onegpu.runtime.step_metrics import StepMeter

    class Rows(list):
        write = list.append

    log = log if log is not None else Rows()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    worker = Worker(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    StepMeter(model, optimizer, plan=Plan(dp=1), worker=worker, log=log)
    for calls in steps:
        for inputs in calls:
            model(inputs).sum().backward()
        with torch.no_grad():
            model(calls[0])  # an evaluation call: not the step's
        optimizer.step()
    return log


def test_a_step_counts_every_training_call_of_the_loop_and_no_evaluation_call():
    import torch

    class Model(torch.nn.Module):  # returns its loss: a 0-dim output
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def forward(self, batch):  # a dict given by position
            return self.layer(batch["x"]).pow(2).mean()

    from onegpu.runtime.data import WAITS

    WAITS.waited(0.1, global_rows=5)  # a batch of 5 rows a prepared loader yielded before this model's prepare
    batch = {"x": torch.ones(4, 3)}
    model = Model()
    rows = meter_rows(model, [[batch, {"x": torch.zeros(2, 3)}], [batch]])
    first, second = rows
    assert first["throughput(sps)"] * first["time_metrics/end_to_end(s)"] == pytest.approx(6)  # 4 + 2 samples
    assert second["throughput(sps)"] * second["time_metrics/end_to_end(s)"] == pytest.approx(4)
    assert first["loss_metrics/global_avg_loss"] != second["loss_metrics/global_avg_loss"]
    assert "grad_norm" not in first  # the loop did not clip


def test_metrics_that_cannot_be_written_stop_with_one_line_and_the_training_goes_on(capsys):
    import torch

    class Full:
        def write(self, row):
            raise OSError(28, "No space left on device")

    model = torch.nn.Linear(3, 1)
    meter_rows(model, [[torch.ones(2, 3)], [torch.ones(2, 3)]], log=Full())
    assert capsys.readouterr().err == "onegpu: metrics stopped: OSError: [Errno 28] No space left on device\n"


def test_the_norm_clip_grad_norm_returned_is_kept_once():
    import torch

    from onegpu.launch.clip_norms import record_clipping, take_norm

    record_clipping()
    layer = torch.nn.Linear(3, 1)
    layer(torch.ones(2, 3)).sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(layer.parameters(), 0.1)  # what the loop sees is torch's result
    assert take_norm() == float(norm) and take_norm() is None
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in layer.parameters()])) <= 0.1 + 1e-6


def test_the_progress_line_and_tensorboard_tags_show_the_rows_figures():
    figures = row(flops_per_item=1e9, peak_flops=1e13)
    line = progress_text(figures)
    assert line.startswith("onegpu: step 3 | loss 3 | grad norm 0.5 | 2,048 tokens/s | 2 s/step (data 25 %)")
    assert "TFLOPs/worker, MFU" in line and "peak memory 3.00 GiB" in line
    tags = scalars(figures)
    assert tags["memory/peak_per_worker(GiB)/rank1"] == 3.0 and "step" not in tags and "time" not in tags


def test_off_a_terminal_the_progress_is_a_plain_line_now_and_then_and_the_last_at_the_end():
    stream = io.StringIO()
    progress = ProgressLine(stream)
    for step in (1, 2, 3):
        progress.show(row(step=step))
    progress.close()
    assert [line.split(" |")[0] for line in stream.getvalue().splitlines()] == ["onegpu: step 1", "onegpu: step 3"]


def test_rows_are_in_the_file_as_soon_as_written(tmp_path):
    log = MetricsLog(tmp_path)
    log.write(row(step=1))
    log.write({**row(step=2), "loss_metrics/global_avg_loss": float("nan")})  # a diverged loss: null in JSON
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # before close: a killed job keeps them
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert json.loads(lines[1])["loss_metrics/global_avg_loss"] is None
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_the_job_directory_is_kept_without_its_resize_requests(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path))
    with job_directory("alice-1") as directory:
        for name in (REQUEST, ACCEPTED, "job.json"):
            (directory / name).write_text("{}")
    assert sorted(p.name for p in directory.iterdir()) == ["job.json"]


def test_a_temporary_job_directory_is_removed(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("not a directory")  # onegpu's home cannot be written
    monkeypatch.setenv("ONEGPU_HOME", str(home))
    with job_directory("alice-2") as directory:
        assert directory.is_dir()
    assert not directory.exists()


def test_job_json_says_how_the_job_started_resized_and_ended(tmp_path, monkeypatch):
    from onegpu.pool.config import load_pool
    from onegpu.pool.lease import JobLease

    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path / "home"))
    pool = load_pool()
    start_record(tmp_path, lease=JobLease(job="bob-1", devices=(0, 1), pool=pool), script="t.py", args=["--x"],
                 log_dir=tmp_path / "logs")  # fmt: skip
    record = read_job(tmp_path)
    assert record["job"] == "bob-1" and record["workers"] == 2 and record["devices"] == [0, 1]
    assert record["args"] == ["--x"] and record["ended"] is None and record["log_dir"] == str(tmp_path / "logs")
    assert not has_ended(tmp_path)
    record_resize(tmp_path, lease=JobLease(job="bob-1", devices=(0,), pool=pool))
    end_record(tmp_path, code=1, error="rank 1 failed")
    record = read_record(tmp_path)
    assert record["workers"] == 1 and [r["workers"] for r in record["resizes"]] == [1]
    assert record["exit"] == 1 and record["error"] == "rank 1 failed" and has_ended(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]  # written whole: no staging file left


def test_the_launcher_records_the_end_however_the_job_ends(tmp_path):
    from onegpu.errors import LaunchError
    from onegpu.launch.run import _recorded

    (tmp_path / "job.json").write_text(json.dumps({"ended": None}))
    with _recorded(tmp_path, lost=[]):
        pass
    assert read_job(tmp_path)["exit"] == 0 and read_job(tmp_path)["error"] is None
    with pytest.raises(LaunchError), _recorded(tmp_path, lost=[]):
        raise LaunchError("rank 0 ran out of memory")
    assert read_job(tmp_path)["exit"] == 1 and read_job(tmp_path)["error"] == "rank 0 ran out of memory"


@pytest.mark.slow
def test_a_stopped_two_worker_job_leaves_its_record(tmp_path):
    """One job, stopped by SIGTERM once it trained: its metrics (in its --log-dir), event files, plan and end stay."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    home, out, logs = tmp_path / "home", tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    env = {**os.environ, "ONEGPU_HOME": str(home), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "onegpu", "run", "--workers", "2", "--log-dir", str(logs),
               "tests/scripts/metrics_job.py", str(out)]  # fmt: skip
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "results.json").exists() or not _tagged(logs / "tensorboard", "grad_norm"):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1]
            time.sleep(0.2)
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
    printed = json.loads((out / "results.json").read_text())
    (directory,) = (home / "jobs").iterdir()
    rows = read_metrics(directory)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss_metrics/global_avg_loss"] for r in rows] == printed["losses"]  # the same values
    assert [r["grad_norm"] for r in rows] == pytest.approx(printed["grad_norms"])
    assert all(set(FIGURES) <= set(r) and r["throughput(tps)"] > 0 for r in rows)
    assert all(len(r["memory/peak_per_worker(GiB)"]) == 2 for r in rows)
    assert stderr.count("onegpu: step 1 |") == 1  # rank 0's alone
    assert read_job(directory)["log_dir"] == str(logs) and not (directory / "metrics.jsonl").exists()
    events = EventAccumulator(str(logs / "tensorboard"))
    events.Reload()
    assert {"loss_metrics/global_avg_loss", "throughput(tps)", "memory/max_active(GiB)"} <= set(
        events.Tags()["scalars"]
    )
    assert read_plan(directory).strategy == "ddp"
    record = read_job(directory)
    assert record["exit"] == 1 and "SIGTERM" in record["error"] and record["ended"] >= record["started"]


def _tagged(events: Path, tag: str) -> bool:
    """Whether the event files hold ``tag`` yet (they are flushed every 2 s)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not events.is_dir():
        return False
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return tag in accumulator.Tags()["scalars"]


def test_a_kept_directory_of_an_ended_job_is_not_taken_for_a_running_job(tmp_path, monkeypatch):
    from onegpu.cli.resize import resize_job
    from onegpu.errors import UsageError
    from onegpu.launch.resizing import jobs_directory, mark_saves_state, requested_workers
    from onegpu.pool.config import load_pool
    from onegpu.pool.lease import pool_ledger

    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path))
    pool = load_pool()
    directory = jobs_directory() / "carol-1"
    directory.mkdir(parents=True)
    mark_saves_state(directory, state=tmp_path / "ckpt")
    (directory / "job.json").write_text(json.dumps({"job": "carol-1", "ended": 100.0, "exit": 0}))
    with pytest.raises(UsageError, match="^no running job 'carol-1'"):  # no lease: the ledger says it ended
        resize_job(pool, job="carol-1", workers=2)
    pool_ledger(pool).acquire(job="carol-1", devices=1, pool_devices=range(4))  # a lease row left behind
    with pytest.raises(UsageError, match="^job carol-1 has ended: onegpu smi lists the running jobs$"):
        resize_job(pool, job="carol-1", workers=2)
    assert requested_workers(directory) is None


def test_log_dir_is_made_absolute_for_the_workers_or_refused_in_one_line(tmp_path, monkeypatch):
    from onegpu.errors import LaunchError
    from onegpu.launch.run import _log_directory
    from onegpu.settings import worker_environment

    monkeypatch.chdir(tmp_path)
    made = _log_directory(Path("runs/a"))
    assert made == tmp_path / "runs" / "a" and made.is_dir()
    assert worker_environment(launcher_pid=1, status_dir=tmp_path, log_dir=made)["ONEGPU_LOG_DIR"] == str(made)
    assert worker_environment(launcher_pid=1, status_dir=tmp_path)["ONEGPU_LOG_DIR"] == str(tmp_path)  # the default
    (tmp_path / "file").write_text("")
    with pytest.raises(
        LaunchError, match=r"^--log-dir .*file/logs: cannot make it .*: give a directory you can write$"
    ):
        _log_directory(Path("file/logs"))
