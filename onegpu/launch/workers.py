"""How many workers stand behind the virtual device (its flavor), and how many CPU threads each gets."""

from __future__ import annotations

from onegpu.errors import UsageError
from onegpu.machine import cpu_cores
from onegpu.settings import settings


def worker_count(requested: int | None = None) -> int:
    """``requested`` (``--workers``), else ONEGPU_WORKERS, else the devices of the user's flavor."""
    source = "--workers"
    if requested is None and settings().workers is not None:
        source, requested = "ONEGPU_WORKERS", settings().workers
    if requested is not None:
        if requested < 1:
            raise UsageError(f"{source} {requested}: a job needs at least 1 worker")
        return requested
    from onegpu.pool.config import load_pool
    from onegpu.pool.flavors import current_flavor

    return current_flavor(load_pool()).devices


def threads_per_worker(local_workers: int) -> int:
    """CPU threads for each of ``local_workers`` processes so they do not oversubscribe the cores."""
    return max(1, cpu_cores() // max(1, local_workers))
