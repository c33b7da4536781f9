"""Read what a job of ``onegpu run`` leaves in its directory, ``$ONEGPU_HOME/jobs/<job>``.

- ``job.json``: the launcher's account of the job (script, workers, devices, start, end, exit, log_dir);
- ``plan.json``: the plan its workers executed (with the planner's prediction and reasons when it chose it);
- ``<log_dir>/metrics.jsonl``: one line per optimizer step, with torchtitan's metric names.

The job's directory is kept after the job ends, so these can be read afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onegpu.errors import UsageError
from onegpu.plan import Plan
from onegpu.pool.config import onegpu_home

JOB, PLAN, METRICS = "job.json", "plan.json", "metrics.jsonl"


def job_dir(job: str) -> Path:
    """The directory of job ``job`` (a name that ``onegpu run`` printed, or a path to the directory itself)."""
    given = Path(job)
    if (given / JOB).is_file():
        return given
    directory = onegpu_home() / "jobs" / job
    if not directory.is_dir():
        raise UsageError(
            f"no job {job!r} in {directory.parent}: give a job name that `onegpu run` printed (see `ls "
            f"{directory.parent}`), or set ONEGPU_HOME to the home the job ran with"
        )
    return directory


def read_job(directory: Path) -> dict[str, Any]:
    """``job.json``: what the launcher wrote of the job; {} for a directory without one."""
    return _json(directory / JOB) or {}


def read_plan(directory: Path) -> Plan | None:
    """The plan the job's workers executed, or None before they prepared one."""
    text = _text(directory / PLAN)
    return Plan.from_json(text) if text else None


def log_dir(directory: Path) -> Path:
    """Where the job's metrics and TensorBoard files are: ``--log-dir``, else the job's directory."""
    logs = read_job(directory).get("log_dir")
    return Path(logs) if logs else directory


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    """The job's per-step metrics, in step order; a line cut short by a killed job is left out."""
    text = _text(log_dir(directory) / METRICS) or ""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _json(path: Path) -> Any:
    text = _text(path)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
