"""The default rule until Advanced Parallelization: replicate when it fits, else shard fully."""

from __future__ import annotations

from onegpu.errors import UsageError
from onegpu.plan import Plan
from onegpu.planner.memory import GIB, MemoryEstimate


def choose_plan(*, estimate: MemoryEstimate, budget_bytes: int, world_size: int, strategy: str | None = None) -> Plan:
    """DDP when the whole model's training state and activations fit one worker's budget, else FSDP."""
    if strategy is not None:
        if strategy not in ("ddp", "fsdp"):
            raise UsageError(f"strategy={strategy!r} is not known: use 'ddp', 'fsdp' or leave it unset")
        sharding = "none" if strategy == "ddp" else "parameters"
        return Plan(dp=world_size, sharding=sharding, reason=f"strategy={strategy!r} was asked for")
    need = f"{estimate.total / GIB:.2f} GiB ({estimate.describe()})"
    if world_size == 1:
        fits = "fits" if estimate.total <= budget_bytes else "exceeds"
        return Plan(dp=1, sharding="none", reason=f"one worker: {need} {fits} its {budget_bytes / GIB:.2f} GiB budget")
    if estimate.total <= budget_bytes:
        return Plan(
            dp=world_size, sharding="none", reason=f"{need} fits the {budget_bytes / GIB:.2f} GiB budget per worker"
        )
    return Plan(
        dp=world_size,
        sharding="parameters",
        reason=f"{need} exceeds the {budget_bytes / GIB:.2f} GiB budget per worker",
    )
