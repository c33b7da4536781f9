"""The files of saved states: ``directory/step-<step:08d>/``, whole once its ``COMMITTED`` marker exists.

torch.distributed.checkpoint writes each worker's part (``*.distcp``) and, last, rank 0 its ``.metadata``;
onegpu adds ``onegpu.pt`` (rank 0: the step, positions, schedulers, extras), ``random-<rank>.pt`` (each
worker's random state), ``config.json`` (a model with a Hugging Face config) and, once every worker has
written its part, ``COMMITTED``. A directory without the marker (a save that crashed or is running) is
never loaded, and removed once a newer state is committed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from onegpu.errors import UsageError

COMMITTED = "COMMITTED"
STEP = re.compile(r"step-(\d{8,})")
SUMMARY, RANDOM = "onegpu.pt", "random-{rank}.pt"


def step_directory(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}"


def _steps(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def committed(directory: Path) -> list[Path]:
    """The committed states in ``directory``, oldest first."""
    return [path for _, path in _steps(directory) if (path / COMMITTED).is_file()]


def half_written(directory: Path) -> list[Path]:
    """States newer than the newest committed one that were never committed (a crash mid-save)."""
    done = committed(directory)
    newest = int(STEP.fullmatch(done[-1].name).group(1)) if done else -1
    return [path for step, path in _steps(directory) if step > newest and not (path / COMMITTED).is_file()]


def newest_state(path: Path) -> Path | None:
    """The state ``path`` names: a ``step-*`` directory itself (committed), or the newest committed one in it."""
    if STEP.fullmatch(path.name) and (path / COMMITTED).is_file():
        return path
    done = committed(path)
    return done[-1] if done else None


def check_directory(directory: Path, *, create: bool) -> None:
    """Refuse a path states cannot be written to, in one line: a file, or a directory this user cannot write.
    ``create``: make it and try writing a file in it (at a save); else only check permissions (at a load)."""
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"{existing} is a file: give save_state and load_state a directory for the states")
    if not create:
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(
                f"cannot write states to {directory}: {existing} is not writable (give a writable directory)"
            )
        return
    probe = directory / f".onegpu-write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"cannot write states to {directory}: {error.strerror} (give a writable directory)") from None


def uncommit(path: Path) -> None:
    """A state about to be written again stops counting before any of its files changes."""
    with contextlib.suppress(FileNotFoundError):
        (path / COMMITTED).unlink()
        _fsync(path)


def commit(path: Path, *, step: int, workers: int) -> None:
    """Mark ``path`` whole (rank 0, once every worker has written its part)."""
    marker = path / f".{COMMITTED}.tmp"
    with open(marker, "w") as handle:
        json.dump({"step": step, "workers": workers, "time": time.time()}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(marker, path / COMMITTED)
    _fsync(path)


def prune(directory: Path, *, keep: int) -> None:
    """Keep the newest ``keep`` committed states (the newest always); remove older ones, and uncommitted ones
    older than the newest committed (a crashed save's leftovers)."""
    done = committed(directory)
    if not done:
        return
    newest = int(STEP.fullmatch(done[-1].name).group(1))
    old = done[: -max(keep, 1)]
    stale = [path for step, path in _steps(directory) if step < newest and not (path / COMMITTED).is_file()]
    for path in (*old, *stale):
        uncommit(path)
        shutil.rmtree(path, ignore_errors=True)


def _fsync(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
