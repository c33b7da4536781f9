"""What each worker leaves for its launcher to read after it is gone: its last measured memory and how it
ended, one small file per rank in the job's status directory (``ONEGPU_STATUS_DIR``, made by the launcher),
under a directory of its own per attempt (``attempt-N``, N torchelastic's restart count): a restarted job's
report reads its last attempt's files, never an earlier one's.

A worker killed by a signal writes nothing at its end; its memory file then says how big it last was.
Outside ``onegpu run`` there is no status directory and every function here does nothing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from onegpu.settings import settings


@dataclass(frozen=True)
class Memory:
    """A worker's memory at its last measure, and its peak (bytes): the process's, and its device's on an
    accelerator (None on CPU)."""

    resident: float
    peak: float
    device_peak: float | None = None


@dataclass(frozen=True)
class Ended:
    """A worker that ended by itself: its exit code, and when (microseconds since the epoch)."""

    rank: int
    code: int
    time_us: int


def attempt_directory(status: Path, restart: int) -> Path:
    """Where the workers of attempt ``restart`` (0 for the first, N after N restarts) leave their files."""
    return status / f"attempt-{restart}"


def _directory() -> Path | None:
    status = settings().status_dir
    if status is None:
        return None
    directory = attempt_directory(status, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    directory.mkdir(exist_ok=True)
    return directory


def _write(name: str, data: dict) -> None:
    directory = _directory()
    if directory is None:
        return
    staging = directory / f".{name}.{os.getpid()}"
    staging.write_text(json.dumps(data))
    os.replace(staging, directory / name)  # a reader sees the old file or the new one, never half of one


def _read(directory: Path, name: str) -> dict | None:
    try:
        return json.loads((directory / name).read_text())
    except (OSError, ValueError):
        return None


def record_memory(*, rank: int, resident: float, peak: float, device_peak: float | None = None) -> None:
    _write(f"rank-{rank}.memory", {"resident": resident, "peak": peak, "device_peak": device_peak})


def record_end(*, rank: int, code: int) -> None:
    _write(f"rank-{rank}.ended", {"code": code, "time_us": time.time_ns() // 1000})


def last_memory(directory: Path | None, rank: int) -> Memory | None:
    data = _read(directory, f"rank-{rank}.memory") if directory else None
    return Memory(resident=data["resident"], peak=data["peak"], device_peak=data.get("device_peak")) if data else None


def endings(directory: Path | None = None) -> list[Ended]:
    """The workers that have ended by themselves so far, first to end first."""
    directory = directory or _directory()
    if directory is None:
        return []
    found = []
    for file in directory.glob("rank-*.ended"):
        data = _read(directory, file.name)
        if data is not None:
            found.append(Ended(rank=int(file.name.split("-")[1].split(".")[0]), **data))
    return sorted(found, key=lambda ended: ended.time_us)
