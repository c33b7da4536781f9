"""How many workers stand behind the virtual device (its flavor), and how many CPU threads each gets."""

from __future__ import annotations

import os

from onegpu.errors import UsageError


def worker_count(requested: int | None = None) -> int:
    """``requested`` (``--workers``), else ONEGPU_WORKERS, else the devices of the user's flavor."""
    source = "--workers"
    if requested is None and os.environ.get("ONEGPU_WORKERS"):
        source, raw = "ONEGPU_WORKERS", os.environ["ONEGPU_WORKERS"]
        try:
            requested = int(raw)
        except ValueError:
            raise UsageError(
                f"ONEGPU_WORKERS={raw!r} is not a whole number: set it to the number of workers, e.g. 2"
            ) from None
    if requested is not None:
        if requested < 1:
            raise UsageError(f"{source} {requested}: a job needs at least 1 worker")
        return requested
    from onegpu.pool.config import load_pool
    from onegpu.pool.flavors import current_flavor

    return current_flavor(load_pool()).devices


def threads_per_worker(local_workers: int) -> int:
    """CPU threads for each of ``local_workers`` processes so they do not oversubscribe the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local_workers))
