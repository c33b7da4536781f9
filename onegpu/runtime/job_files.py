"""What rank 0 of a job of ``onegpu run`` leaves in the job's directory (``ONEGPU_STATUS_DIR``, kept after the
job: ``onegpu.report.records`` reads it): ``plan.json``, the plan its workers executed, and the per-step
metrics (``runtime/step_metrics.py``, written to ``ONEGPU_LOG_DIR``). Outside ``onegpu run`` nothing is written."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from onegpu.launch.process_group import Worker
from onegpu.plan import Plan
from onegpu.settings import settings

PLAN = "plan.json"
_logs: dict[Path, object] = {}  # the process's MetricsLog of each directory, once opened


def write_plan(plan: Plan, *, worker: Worker) -> None:
    """Rank 0: ``plan.json``, whole or not at all."""
    status = settings().status_dir
    if status is None or not worker.is_main:
        return
    try:
        staging = status / f".{PLAN}.{os.getpid()}"
        staging.write_text(plan.to_json())
        os.replace(staging, status / PLAN)
    except OSError:  # the record is lost, not the training
        pass


def observe_steps(
    plan: Plan, model, optimizers: tuple[torch.optim.Optimizer, ...], *, worker: Worker, flops_per_item=None
) -> None:
    """Rank 0 records each step of the last optimizer (unless ``ONEGPU_METRICS=0``). ``flops_per_item``: the
    model's FLOPs per token (or sample) when counted, for plans without a prediction (no MFU then: no peak)."""
    options = settings()
    if options.status_dir is None or not options.metrics or not worker.is_main or not optimizers:
        return
    from onegpu.launch.clip_norms import record_clipping
    from onegpu.runtime.step_metrics import StepMeter

    record_clipping()  # done already before the script started (launch/worker.py)
    log = _metrics_log(options.log_dir or options.status_dir)
    StepMeter(model, optimizers[-1], plan=plan, worker=worker, log=log, flops_per_item=flops_per_item)


def _metrics_log(directory: Path):
    if directory not in _logs:
        from onegpu.runtime.metrics_log import MetricsLog
        from onegpu.runtime.progress_line import ProgressLine

        _logs[directory] = MetricsLog(directory, progress=ProgressLine())
    return _logs[directory]
