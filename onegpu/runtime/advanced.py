"""Advanced Parallelization in ``prepare``: the planner picks the plan, among what the runtime executes."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from onegpu.errors import UsageError
from onegpu.planner.memory import optimizer_state_slots
from onegpu.planner.pins import parse_pins
from onegpu.planner.plan import Plan
from onegpu.planner.search import Capabilities

# What the runtime can execute today; the planner offers nothing else to prepare().
RUNTIME = Capabilities(
    tp=True,
    pp=True,
    shardings=("none", "gradients", "parameters"),
    offloads=("none", "parameters"),
    precisions=("fp32",),
    accumulation=False,
    schedules=("gpipe", "1f1b", "interleaved", "zero-bubble"),
    interleaving_with_sharding=False,
)

_pins: dict[str, Any] | None = None


def enable_advanced_parallelization(**pins: Any) -> None:
    """Let the planner choose how ``prepare`` splits the work; pins (e.g. ``sharding="parameters"``) constrain it."""
    global _pins
    parse_pins(**pins)  # a wrong pin fails here, at the line that gave it
    _pins = dict(pins)


def disable_advanced_parallelization() -> None:
    global _pins
    _pins = None


def advanced_pins() -> dict[str, Any] | None:
    return _pins


def plan_for_runtime(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None,
    sample: Any,
    global_batch: int,
    world_size: int,
    budget_bytes: int,
    pins: dict[str, Any],
) -> Plan:
    """The planner's choice for this job on this machine, made on rank 0 and shared with every worker."""
    from onegpu.planner.cluster import measure_job_cluster

    rank = dist.get_rank() if dist.is_initialized() else 0
    from onegpu.runtime.distributed import current_worker

    device = current_worker().device
    cluster = measure_job_cluster(rank=rank, world_size=world_size, device=device)  # every worker takes part
    chosen: list[Plan | tuple[str, str] | None] = [None]
    failure: Exception | None = None
    if rank == 0:
        try:
            chosen[0] = _search(
                model,
                cluster=cluster,
                optimizer=optimizer,
                sample=sample,
                global_batch=global_batch,
                budget_bytes=budget_bytes,
                pins=pins,
            )
        except Exception as error:  # every worker raises it, not only rank 0
            kind = UsageError.__name__ if isinstance(error, UsageError) else type(error).__name__
            failure, chosen[0] = error, (kind, str(error))
    if dist.is_initialized():  # an error travels as text: exceptions do not all survive pickling
        dist.broadcast_object_list(chosen, src=0)
    if failure is not None and not isinstance(failure, UsageError):
        raise failure
    if isinstance(chosen[0], tuple):
        kind, message = chosen[0]
        if kind == UsageError.__name__:
            raise UsageError(message)
        raise RuntimeError(f"the planner failed on worker 0 ({kind}: {message})")
    return chosen[0]


def _search(model, *, cluster, optimizer, sample, global_batch, budget_bytes, pins) -> Plan:
    from onegpu.planner.analysis import analyze
    from onegpu.planner.search import plan

    cluster = replace(cluster, device=replace(cluster.device, memory_gb=budget_bytes / 1e9))
    seq_len = sequence_length(sample)
    one = first_sample(sample)
    profile = analyze(model, seq_len=seq_len, precision="fp32", sample=None if hasattr(model, "config") else one)
    capabilities = RUNTIME
    tp = parse_pins(**pins).tp
    if cluster.world_size > 1 and tp != 1:  # tensor parallelism only where the model's structure allows it
        from onegpu.parallel.tp_structure import find_tensor_parallel, require_tensor_parallel

        if tp is not None:
            structure = require_tensor_parallel(model, sample, tp=tp)
        else:
            structure = find_tensor_parallel(model, sample, tp=2)
            if not structure.found:
                print(f"onegpu: no tensor parallelism: {'; '.join(structure.reasons)}", file=sys.stderr, flush=True)
                capabilities = replace(RUNTIME, tp=False)
        capabilities = replace(capabilities, sequence_parallel=structure.sequence_parallel)
    return plan(
        profile,
        global_batch_size=global_batch,
        seq_len=seq_len,
        cluster=cluster,
        budget_fraction=1.0,
        optimizer_slots=optimizer_state_slots(optimizer),
        capabilities=capabilities,
        **pins,
    )


def sequence_length(sample: Any) -> int:
    ids = sample.get("input_ids") if isinstance(sample, dict) else None
    return int(ids.shape[1]) if torch.is_tensor(ids) and ids.dim() > 1 else 1


def first_sample(sample: Any) -> Any:
    if torch.is_tensor(sample):
        return sample[:1]
    if isinstance(sample, dict):
        return {k: first_sample(v) for k, v in sample.items()}
    if isinstance(sample, (list, tuple)):
        return type(sample)(first_sample(v) for v in sample)
    return sample


def describe(plan: Plan, *, budget_bytes: int) -> str:
    """The one line prepare() logs about the planner's choice."""
    p, s = plan.predicted, plan.search
    return (
        f"advanced parallelization: {s.candidates} candidates, {s.feasible} fit, {s.seconds:.2f} s | chosen: "
        f"{plan.describe()} | predicted {p.step_time_s:.3f} s/step, {p.tokens_per_s:,.0f} tokens/s, "
        f"{p.memory_per_device_bytes / 1e9:.2f} of {budget_bytes / 1e9:.2f} GB per worker"
    )
