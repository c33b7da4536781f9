"""A running job's directory, and how ``onegpu resize`` reaches the job through it.

Each job of ``onegpu run`` has a directory, ``$ONEGPU_HOME/jobs/<job>``, kept after the job ends as its
record (``job.json``, ``plan.json``, metrics: ``onegpu.report.records``). It is the job's status directory
(``ONEGPU_STATUS_DIR``; what each worker leaves, ``launch/status.py``) and, while the job runs, holds three
small files, each written whole or not at all:

- ``saves-state``: the workers write it once the script saved or loaded its state (``onegpu.save_state``,
  ``onegpu.load_state``); only such a job can be resized, for only it can continue after a restart;
- ``resize``: the request of ``onegpu resize``, the number of workers wanted;
- ``resized``: written by rank 0 once every worker saved its state at the step boundary where they
  agreed to stop for the request; the workers then end with exit code 0, and the launcher, seeing this
  file, leases the new number of devices and starts the workers again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from onegpu.errors import UsageError
from onegpu.pool.config import onegpu_home, writable_home

SAVES_STATE, REQUEST, ACCEPTED = "saves-state", "resize", "resized"


def jobs_directory() -> Path:
    return onegpu_home() / "jobs"


@contextmanager
def job_directory(job: str) -> Iterator[Path]:
    """The job's directory, kept after the block as the job's record (only the resize requests are removed);
    a temporary one, removed after the block (and a job that cannot be resized), when onegpu's home cannot be
    written."""
    try:
        directory, kept = writable_home() / "jobs" / job, True
        directory.mkdir(parents=True)
    except (UsageError, OSError):
        directory, kept = Path(tempfile.mkdtemp(prefix=f"onegpu-{job}-")), False
    try:
        yield directory
    finally:
        if kept:
            for name in (REQUEST, ACCEPTED):
                (directory / name).unlink(missing_ok=True)
        else:
            shutil.rmtree(directory, ignore_errors=True)


def _write(path: Path, data: object) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(json.dumps(data))
    os.replace(staging, path)  # a reader sees the old file or the new one, never half of one


def _read(path: Path) -> object | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def mark_saves_state(directory: Path, *, state: Path) -> None:
    _write(directory / SAVES_STATE, {"state": str(state)})


def saves_state(directory: Path) -> bool:
    return (directory / SAVES_STATE).exists()


def request_resize(directory: Path, *, workers: int) -> None:
    _write(directory / REQUEST, {"workers": workers})


def requested_workers(directory: Path) -> int | None:
    """The number of workers ``onegpu resize`` asked for, or None."""
    if not (directory / REQUEST).exists():  # one stat per step while nothing is asked
        return None
    data = _read(directory / REQUEST)
    return data.get("workers") if isinstance(data, dict) else None


def accept_resize(directory: Path, *, workers: int) -> None:
    """Rank 0, once every worker saved: the job ends for a restart on ``workers`` workers."""
    _write(directory / ACCEPTED, {"workers": workers})


def take_resize(directory: Path) -> int | None:
    """For the launcher, once its workers ended: the number of workers to start again, or None when they
    ended for good. The request is done with."""
    data = _read(directory / ACCEPTED)
    if not isinstance(data, dict):
        return None
    if requested_workers(directory) == data["workers"]:  # not a newer request, made meanwhile
        (directory / REQUEST).unlink(missing_ok=True)
    (directory / ACCEPTED).unlink()
    for attempt in directory.glob("attempt-*"):  # the next workers' attempts count from 0 again
        shutil.rmtree(attempt, ignore_errors=True)
    return int(data["workers"])
