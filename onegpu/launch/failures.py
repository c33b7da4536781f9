"""How a worker's failure reaches the launcher, and which worker the launcher blames.

A worker that raises writes torchelastic's per-worker error file. When one worker fails, torchelastic
stops the others with SIGTERM, and peers waiting on it in a collective fail with a connection error:
those failures are consequences, never the cause. The cause is the first other failure: an error, an
exit code, a signal (SIGKILL: possibly the kernel's out-of-memory killer), or, when every failure is a
consequence, a worker that ended while the others still needed it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from onegpu.launch.status import endings, last_memory

# what a worker sees when a peer has gone: gloo's and NCCL's connection errors
PEER_GONE = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|gloo/transport|NCCL|remote process|DistNetworkError", re.IGNORECASE
)


def record_failure(message: str, *, usage: bool = False) -> None:
    """Write ``message`` where the launcher looks for this worker's error (no-op outside a launch).

    ``onegpu_time_us`` lets the launcher tell which worker failed first (torchelastic keeps seconds).
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {
        "message": {
            "message": message,
            "extraInfo": {
                "py_callstack": traceback.format_exc(),
                "timestamp": str(int(time.time())),
                "onegpu_time_us": time.time_ns() // 1000,
                "onegpu_usage": usage,
            },
        }
    }
    with open(path, "w") as handle:
        json.dump(data, handle)


def is_peer_gone(message: str) -> bool:
    """Whether an error is what a worker sees when another worker has died or left."""
    return bool(PEER_GONE.search(message))


@dataclass(frozen=True)
class Failure:
    """One failed worker as the launcher saw it."""

    rank: int
    exitcode: int
    message: str | None  # from its error file; None when it died without writing one
    time_us: float  # when it failed (for a silent death: a second before torchelastic noticed it)
    usage: bool

    @property
    def consequence(self) -> bool:
        """Stopped by torchelastic because another worker failed, or failed because a peer was gone."""
        if self.message is None:
            return self.exitcode == -signal.SIGTERM
        return is_peer_gone(self.message)


def failures_of(failure: ChildFailedError) -> list[Failure]:
    found = []
    for rank, process in failure.failures.items():
        info = process.error_file_data.get("message")
        extra = info.get("extraInfo", {}) if isinstance(info, dict) else {}
        found.append(
            Failure(
                rank=rank,
                exitcode=process.exitcode,
                message=info["message"] if isinstance(info, dict) else None,
                # torchelastic notes a silent death to the second, up to a second after it happened
                time_us=extra.get("onegpu_time_us", (process.timestamp - 1) * 1_000_000),
                usage=bool(extra.get("onegpu_usage")),
            )
        )
    return sorted(found, key=lambda f: (f.time_us, f.rank))


def root_cause(failure: ChildFailedError | list[Failure], *, status: Path | None = None) -> str:
    """One line on the worker whose failure stopped the job, and why; ``status`` is the job's status directory."""
    failed = (
        failures_of(failure)
        if isinstance(failure, ChildFailedError)
        else sorted(failure, key=lambda f: (f.time_us, f.rank))
    )
    causes = [f for f in failed if not f.consequence]
    if causes:
        return describe(causes[0], status=status)
    early = [e for e in endings(status) if e.rank not in {f.rank for f in failed}]
    if early:
        return (
            f"worker rank {early[0].rank} ended (exit code {early[0].code}) while the other workers still needed it: "
            "every worker must run the whole script (is a return or sys.exit taken on one rank only?)"
        )
    return describe(failed[0], status=status)


def describe(failure: Failure, *, status: Path | None) -> str:
    if failure.usage:
        return failure.message
    if failure.message is not None:
        return f"worker rank {failure.rank} failed (exit code {_meant_code(failure, status)}): {failure.message}"
    if failure.exitcode >= 0:
        return f"worker rank {failure.rank} ended with exit code {failure.exitcode} without saying why"
    try:
        name = signal.Signals(-failure.exitcode).name
    except ValueError:
        name = f"signal {-failure.exitcode}"
    said = f"worker rank {failure.rank} was killed by {name}"
    if name != "SIGKILL":
        return said
    memory = last_memory(status, failure.rank)
    measured = (
        f" (its memory: {_size(memory.resident)} at the last measure, {_size(memory.peak)} at peak)" if memory else ""
    )
    return f"{said}, possibly out of memory{measured}: if so, use a smaller batch or more workers"


def _meant_code(failure: Failure, status: Path | None) -> int:
    """The exit code the worker ended with, even when torchelastic stopped it while it was exiting."""
    if failure.exitcode >= 0:
        return failure.exitcode
    return next((e.code for e in endings(status) if e.rank == failure.rank), failure.exitcode)


def _size(size: float) -> str:
    return f"{size / 2**30:.1f} GB" if size >= 2**30 else f"{size / 2**20:.0f} MB"
