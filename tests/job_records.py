"""Synthetic job records, as `onegpu run` leaves them in ``<home>/jobs/<job>`` (the shape docs in COMMON: job.json,
plan.json, metrics.jsonl with torchtitan's names), and a measured pipeline trace, for the report's tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

from onegpu.plan import Plan

STARTED = 1_764_000_000.0  # 2025-11-24 16:00 UTC


def write_job(home: Path, name: str, *, plan: Plan | None, steps: int, workers: int = 2, ended: bool = True) -> Path:
    """A job directory with job.json, plan.json (when ``plan``) and ``steps`` rows of metrics.jsonl."""
    directory = home / "jobs" / name
    directory.mkdir(parents=True)
    step_s = 0.5
    job = {
        "job": name, "user": "ada", "script": "train.py", "args": ["--lr", "3e-4"], "workers": workers,
        "devices": list(range(workers)), "nodes": ["node-a"], "flavor": None, "backend": "local",
        "started": STARTED, "ended": STARTED + 30 + steps * step_s if ended else None, "exit": 0 if ended else None,
        "error": None, "log_dir": str(directory), "resizes": [],
    }  # fmt: skip
    (directory / "job.json").write_text(json.dumps(job))
    if plan is not None:
        (directory / "plan.json").write_text(plan.to_json())
    rows = [metrics_row(step, workers=workers, step_s=step_s) for step in range(1, steps + 1)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


def metrics_row(step: int, *, workers: int, step_s: float) -> dict:
    """One optimizer step's figures: a falling loss, a steady throughput, memory per worker."""
    return {
        "step": step, "time": STARTED + 30 + step * step_s,
        "loss_metrics/global_avg_loss": 4.0 * math.exp(-step / 8) + 1.5, "grad_norm": 2.0 / math.sqrt(step),
        "throughput(tps)": 8192 / step_s * (0.6 if step == 1 else 1.0), "time_metrics/end_to_end(s)": step_s,
        "time_metrics/data_loading(s)": 0.01, "time_metrics/data_loading(%)": 2.0, "tflops": 0.9, "mfu(%)": 41.5,
        "memory/max_active(GiB)": 1.25 + 0.05 * workers,
        "memory/peak_per_worker(GiB)": [1.2 + 0.05 * rank for rank in range(workers)],
    }  # fmt: skip


def pipeline_trace(*, ranks: int = 2, microbatches: int = 4) -> dict:
    """A measured 1F1B-like trace as onegpu.report.timeline writes it: per rank (a process) each kind of event a
    thread, forward and backward of each micro-batch, a send after each forward."""
    events: list[dict] = []
    for rank in range(ranks):
        events.append({"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank} (stage {rank})"}})
        for tid, kind in enumerate(("forward", "backward", "send forward")):
            events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": kind}})
        clock = rank * 1_000.0
        for m in range(microbatches):
            events.append(
                {"ph": "X", "name": f"F{m}", "cat": "forward", "pid": rank, "tid": 0, "ts": clock, "dur": 900}
            )
            events.append({"ph": "X", "name": f"send F{m}", "cat": "send forward", "pid": rank, "tid": 2,
                           "ts": clock + 900, "dur": 80})  # fmt: skip
            clock += 1_000
        for m in range(microbatches):
            events.append(
                {"ph": "X", "name": f"B{m}", "cat": "backward", "pid": rank, "tid": 1, "ts": clock, "dur": 1800}
            )
            clock += 1_900
    return {"traceEvents": events, "otherData": {"bubble_measured": 0.21, "bubble_predicted": 0.2}}


def launched_job(out: Path) -> Path:
    """The directory `onegpu run` kept in ``$ONEGPU_HOME/jobs`` for the job that was given ``out`` as an argument."""
    from onegpu.pool.config import onegpu_home

    for record in sorted((onegpu_home() / "jobs").glob("*/job.json")):
        if str(out) in json.loads(record.read_text()).get("args", ()):
            return record.parent
    raise AssertionError(f"no job of {out} kept in {onegpu_home() / 'jobs'} (job.json is written by `onegpu run`)")
