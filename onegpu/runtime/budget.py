"""The memory one worker may use: the device's memory, or the machine's shared among CPU workers."""

from __future__ import annotations

import os

import torch

from onegpu.errors import UsageError

DEVICE_FRACTION = 0.9


def memory_budget_bytes(*, device: torch.device, local_world_size: int, budget_gb: float | None = None) -> int:
    """``budget_gb`` (or ONEGPU_MEMORY_BUDGET_GB) when given, else what this worker's device offers."""
    if budget_gb is None and os.environ.get("ONEGPU_MEMORY_BUDGET_GB"):
        raw = os.environ["ONEGPU_MEMORY_BUDGET_GB"]
        try:
            budget_gb = float(raw)
        except ValueError:
            raise UsageError(
                f"ONEGPU_MEMORY_BUDGET_GB={raw!r} is not a number: set it to the GiB one worker may use, e.g. 8"
            ) from None
    if budget_gb is not None:
        if budget_gb <= 0:
            raise UsageError(f"memory budget {budget_gb} GiB must be positive: give the GiB one worker may use, e.g. 8")
        return int(budget_gb * 1024**3)
    if device.type == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(total * DEVICE_FRACTION / max(1, local_world_size))
    _, total = torch.accelerator.get_memory_info(device.index)
    return int(total * DEVICE_FRACTION)
