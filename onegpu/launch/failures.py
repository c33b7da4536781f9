"""How a worker's failure reaches the launcher: torchelastic's per-worker error file."""

from __future__ import annotations

import json
import os
import time
import traceback

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


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


def root_cause(failure: ChildFailedError) -> str:
    """One line on the worker that failed first; workers stopped by a signal come last."""

    def order(item):
        rank, process = item
        info = process.error_file_data.get("message", {})
        when = info.get("extraInfo", {}).get("onegpu_time_us", float("inf")) if isinstance(info, dict) else float("inf")
        return (process.exitcode < 0 or not info, when, rank)

    rank, process = min(failure.failures.items(), key=order)
    info = process.error_file_data.get("message")
    if not isinstance(info, dict):
        return f"worker rank {rank} failed (exit code {process.exitcode}): {process.message}"
    if info.get("extraInfo", {}).get("onegpu_usage"):
        return info["message"]
    return f"worker rank {rank} failed (exit code {process.exitcode}): {info['message']}"
