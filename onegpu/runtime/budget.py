"""The memory one worker may use: the device's memory, or the machine's shared among CPU workers."""

from __future__ import annotations

import torch

from onegpu.errors import UsageError
from onegpu.machine import memory_bytes
from onegpu.settings import settings

DEVICE_FRACTION = 0.9


def memory_budget_bytes(*, device: torch.device, local_world_size: int, budget_gb: float | None = None) -> int:
    """``budget_gb`` (or ONEGPU_MEMORY_BUDGET_GB) when given, else what this worker's device offers."""
    if budget_gb is None:
        budget_gb = settings().memory_budget_gb
    if budget_gb is not None:
        if budget_gb <= 0:
            raise UsageError(f"memory budget {budget_gb} GiB must be positive: give the GiB one worker may use, e.g. 8")
        return int(budget_gb * 1024**3)
    if device.type == "cpu":
        return int(memory_bytes() * DEVICE_FRACTION / max(1, local_world_size))
    _, total = torch.accelerator.get_memory_info(device.index)
    return int(total * DEVICE_FRACTION)
