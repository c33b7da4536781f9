"""``job.json``: the launcher's account of a job of ``onegpu run``, in the job's directory (kept after the job).

Written when the workers first start, rewritten at each resize and at the end (exit code, one-line error, end
time); always whole (a temporary file renamed over the old one), so a reader sees one version or the next.
``onegpu.report.records.read_job`` reads it.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from onegpu.pool.flavors import all_flavors
from onegpu.pool.lease import JobLease

JOB_FILE = "job.json"


def _write(directory: Path, record: dict[str, Any]) -> None:
    staging = directory / f".{JOB_FILE}.{os.getpid()}"
    staging.write_text(json.dumps(record, indent=1))
    os.replace(staging, directory / JOB_FILE)


def read_record(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _placement(lease: JobLease) -> dict[str, Any]:
    """Where the job runs: its devices, their nodes, its flavor (None: a size no flavor names), its backend."""
    node_of = lease.pool.node_of()
    nodes = list(dict.fromkeys(node_of.get(d) or socket.gethostname() for d in lease.devices))
    flavor = next((f.name for f in all_flavors(lease.pool) if f.devices == len(lease.devices)), None)
    return {"workers": len(lease.devices), "devices": list(lease.devices), "nodes": nodes, "flavor": flavor,
            "backend": lease.pool.backend}  # fmt: skip


def start_record(directory: Path, *, lease: JobLease, script: str, args: list[str], log_dir: Path) -> None:
    """The job as it starts: nothing about its end yet."""
    record = {"job": lease.job, "user": getpass.getuser(), "script": os.path.abspath(script), "args": list(args),
              **_placement(lease), "started": time.time(), "ended": None, "exit": None, "error": None,
              "log_dir": str(log_dir), "resizes": []}  # fmt: skip
    _write(directory, record)


def record_resize(directory: Path, *, lease: JobLease) -> None:
    """The job runs on the lease's devices from now on."""
    record = read_record(directory)
    if record is None:
        return
    record.update(_placement(lease))
    record["resizes"] = [*record.get("resizes", []), {"time": time.time(), "workers": len(lease.devices)}]
    _write(directory, record)


def end_record(directory: Path, *, code: int, error: str | None) -> None:
    """The job ended with exit ``code`` (and, when it failed, its one-line error)."""
    record = read_record(directory)
    if record is None:
        return
    record.update(ended=time.time(), exit=code, error=error)
    _write(directory, record)


def has_ended(directory: Path) -> bool:
    """Whether the job of this directory has ended (its launcher wrote its end)."""
    record = read_record(directory)
    return record is not None and record.get("ended") is not None
