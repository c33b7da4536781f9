"""The default rule until Advanced Parallelization: replicate when it fits, else shard fully.

It decides with the cost model's memory estimate (``memory_model.memory``), the one the search uses, for
``Plan(dp=N)`` and ``Plan(dp=N, sharding="parameters")``.
"""

from __future__ import annotations

from onegpu.errors import UsageError
from onegpu.plan import Plan
from onegpu.planner.cost_model import Workload, memory

GIB = 1024**3


def choose_plan(
    *, work: Workload, budget_bytes: int, world_size: int, cpu: bool, strategy: str | None = None, unmeasured: str = ""
) -> Plan:
    """DDP when one worker holding the whole model fits ``budget_bytes`` (training state, activations of its
    slice of ``work.global_batch``, buffers, runtime), else FSDP. ``cpu``: the workers are CPU processes;
    ``unmeasured``: why the profile holds parameter counts only (activations are then not counted)."""
    if strategy is not None:
        if strategy not in ("ddp", "fsdp"):
            raise UsageError(f"strategy={strategy!r} is not known: use 'ddp', 'fsdp' or leave it unset")
        sharding = "none" if strategy == "ddp" else "parameters"
        return Plan(dp=world_size, sharding=sharding, reason=f"strategy={strategy!r} was asked for")
    replicated = Plan(dp=world_size)
    need = memory(replicated, work, cpu=cpu)
    total = sum(need.values())
    counted = " + ".join(f"{kind.replace('_', ' ')} {_size(size)}" for kind, size in need.items() if size)
    if "activations" not in need:
        counted += f"; activations not counted: {unmeasured or 'the forward was not inspected'}"
    needs = f"{_size(total)} ({counted})"
    budget = f"{_size(budget_bytes)} budget"
    if world_size == 1:
        return Plan(dp=1, reason=f"one worker: {needs} {'fits' if total <= budget_bytes else 'exceeds'} its {budget}")
    if total <= budget_bytes:
        return Plan(dp=world_size, reason=f"{needs} fits the {budget} per worker")
    sharded = sum(memory(Plan(dp=world_size, sharding="parameters"), work, cpu=cpu).values())
    return Plan(
        dp=world_size,
        sharding="parameters",
        reason=f"{needs} exceeds the {budget} per worker; sharded: {_size(sharded)}",
    )


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"
