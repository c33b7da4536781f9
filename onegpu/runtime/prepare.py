"""``onegpu.prepare``: turn single-device training objects into their N-worker equivalents."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from onegpu.errors import UsageError
from onegpu.parallel.blocks import repeated_blocks
from onegpu.planner.memory import estimate_memory
from onegpu.planner.plan import INTERLEAVED, SCHEDULES, Plan
from onegpu.planner.simple_rule import choose_plan
from onegpu.runtime.advanced import advanced_pins, describe, plan_for_runtime
from onegpu.runtime.budget import memory_budget_bytes
from onegpu.runtime.data import GlobalBatchLoader
from onegpu.runtime.distributed import Worker, broadcast_from_main, collective_timeout, current_worker
from onegpu.runtime.global_batch import GlobalBatchHooks
from onegpu.runtime.materialize import is_on_meta, materialize
from onegpu.runtime.optimizer import parameter_names, repoint
from onegpu.runtime.user_loss import attach_loss_fn, check_loss_fn
from onegpu.runtime.watchdog import process_watchdog


def prepare(
    *objects: Any,
    strategy: str | None = None,
    plan: Plan | None = None,
    memory_budget_gb: float | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> Any:
    """Make a model, its optimizers and data loaders run on all workers; returns them in the same order.

    The model keeps its class and attributes; optimizers are re-pointed at its (possibly
    sharded) parameters; each DataLoader still yields the global batch, of which each worker
    loads its slice. ``strategy`` forces ``"ddp"`` or ``"fsdp"``, ``plan`` a whole Plan; after
    ``onegpu.enable_advanced_parallelization()`` the planner chooses. ``memory_budget_gb`` sets the
    memory one worker may use (default: the device's, or the machine's shared by CPU workers).
    ``loss_fn(output, target)``, for a model that does not compute its loss: ``model(inputs,
    target=y)`` then returns the loss (the global-batch loss), under every plan, pipelines included.
    """
    models = [o for o in objects if isinstance(o, nn.Module)]
    if len(models) != 1:
        raise UsageError(f"onegpu.prepare() takes exactly one model (an nn.Module), got {len(models)}")
    model = models[0]
    _refuse_prepared(objects)
    if loss_fn is not None:
        check_loss_fn(model, loss_fn)
    optimizers = [o for o in objects if isinstance(o, torch.optim.Optimizer)]
    loaders = [o for o in objects if isinstance(o, DataLoader)]
    worker = current_worker()
    names = [parameter_names(model, optimizer) for optimizer in optimizers]

    def wrap(shard):  # the workers of one replica (its stages, its tensor-parallel ranks) read the same slice
        return [GlobalBatchLoader(o, worker=worker, shard=shard) if isinstance(o, DataLoader) else o for o in objects]

    # loaders first: a batch the workers cannot share fails before any heavy work
    shard = None if plan is None else _replica_slice(plan, worker=worker)
    prepared = wrap(shard)

    if plan is None:
        plan = _choose_plan(model, optimizers, loaders, worker=worker, strategy=strategy, budget_gb=memory_budget_gb)
    elif not plan.reason:
        plan = replace(plan, reason="the plan given to prepare()")
    if plan.world_size != worker.world_size:
        raise UsageError(
            f"the plan uses {plan.world_size} workers but this job has {worker.world_size}: "
            f"plan for {worker.world_size} workers, or run with --workers {plan.world_size}"
        )
    if worker.is_main:
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "single process"
        print(
            f"onegpu: {worker.world_size} worker{'s' if worker.world_size > 1 else ''} ({worker.device.type}, "
            f"{backend}) | strategy: {plan.strategy} | {plan.reason}",
            file=sys.stderr,
            flush=True,
        )
    if _replica_slice(plan, worker=worker) != shard:
        prepared = wrap(_replica_slice(plan, worker=worker))
    if plan.pp > 1:
        pipelined = _pipeline(
            model, plan, loaders, worker=worker, optimizers=list(zip(optimizers, names)), loss_fn=loss_fn
        )
        pipelined.onegpu_plan = model.onegpu_plan = plan
        prepared = [pipelined if o is model else o for o in prepared]
        return prepared[0] if len(prepared) == 1 else tuple(prepared)
    data_group = _parallelize(model, plan, worker=worker, loaders=loaders)
    model.onegpu_plan = plan
    for optimizer, groups in zip(optimizers, names):
        repoint(optimizer, model, groups)
    if loss_fn is not None:
        attach_loss_fn(model, loss_fn)
    if worker.world_size > 1:
        watchdog = process_watchdog(rank=worker.rank, timeout_s=collective_timeout())
        GlobalBatchHooks(model, worker=worker, watchdog=watchdog, data_group=data_group, replicas=plan.dp)
        for optimizer in optimizers:
            optimizer.register_step_pre_hook(lambda *_: watchdog.enter("optimizer.step"))
            optimizer.register_step_post_hook(lambda *_: watchdog.leave())
    return prepared[0] if len(prepared) == 1 else tuple(prepared)


def trains(model: nn.Module) -> bool:
    """Whether ``model`` has anything to train (a frozen model, or one without parameters, does not)."""
    return any(p.requires_grad for p in model.parameters())


def _refuse_prepared(objects: tuple) -> None:
    """A model or DataLoader prepared once is not prepared again (its parallel wrappers would stack)."""
    for kind, prepared in (
        ("model", [o for o in objects if hasattr(o, "onegpu_plan")]),
        ("DataLoader", [o for o in objects if isinstance(o, GlobalBatchLoader)]),
    ):
        if prepared:
            raise UsageError(
                f"this {kind} was already prepared by onegpu.prepare(): call prepare once and use the objects it "
                f"returned (to prepare anew, pass newly built ones)"
            )


def _replica_slice(plan: Plan, *, worker: Worker) -> tuple[int, int] | None:
    """Which slice of the batch this worker loads, and of how many: its data-parallel replica's."""
    per_replica = plan.pp * plan.tp
    return None if per_replica == 1 else (worker.rank // per_replica, plan.dp)


def _choose_plan(model, optimizers, loaders, *, worker: Worker, strategy, budget_gb) -> Plan:
    budget = memory_budget_bytes(device=worker.device, local_world_size=worker.local_world_size, budget_gb=budget_gb)
    sample = _sample_slice(loaders[0], world_size=worker.world_size) if loaders else None
    pins = advanced_pins()
    if pins is not None and strategy is None and trains(model):  # the planner plans training
        if sample is None or loaders[0].batch_size is None:
            raise UsageError(
                "advanced parallelization plans from the DataLoader's batches: pass a DataLoader with a "
                "batch_size over a map-style dataset to prepare()"
            )
        chosen = plan_for_runtime(
            model,
            optimizer=optimizers[0] if optimizers else None,
            sample=sample,
            global_batch=loaders[0].batch_size,
            world_size=worker.world_size,
            budget_bytes=budget,
            pins=pins,
        )
        return replace(chosen, reason=describe(chosen, budget_bytes=budget))
    estimate = estimate_memory(model, optimizer=optimizers[0] if optimizers else None, sample=sample)
    return choose_plan(estimate=estimate, budget_bytes=budget, world_size=worker.world_size, strategy=strategy)


def _sample_slice(loader: DataLoader, *, world_size: int) -> Any | None:
    """One worker's slice of a batch, collated from the first samples (no RNG drawn, no loader iterated)."""
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return None
    size = min(len(loader.dataset), math.ceil(loader.batch_size / world_size))
    return loader.collate_fn([loader.dataset[i] for i in range(size)])


EXECUTABLE = "dp workers and pp stages (gpipe, 1f1b; interleaved and zero-bubble without sharding), sharding none/gradients/parameters, activation checkpointing, offload of parameters, fp32"


def _check_executable(plan: Plan) -> None:
    missing = [
        what
        for what, needed in (
            (f"schedule={plan.schedule}", plan.schedule not in SCHEDULES),
            (f"{plan.microbatches} accumulation steps", plan.pp == 1 and plan.microbatches > 1),
            (f"sharding={plan.sharding}", plan.sharding in ("optimizer", "hybrid")),
            (f"sharding with the {plan.schedule} schedule", plan.schedule in INTERLEAVED and plan.sharding != "none"),
            (f"offload={plan.offload}", plan.offload == "optimizer"),
            (f"precision={plan.precision}", plan.precision != "fp32"),
            ("offload without sharded parameters", plan.offload == "parameters" and plan.sharding != "parameters"),
        )
        if needed
    ]
    if missing:
        raise UsageError(
            f"this plan needs {', '.join(missing)}, which the runtime cannot execute yet: use {EXECUTABLE}"
        )


def pipeline_cuts(model: nn.Module, *, stages: int, sample: Any | None) -> list[int]:
    """Where to cut ``model`` into ``stages``: balanced by the planner's per-block FLOPs (forward and
    backward; the head and loss on the last stage), or by parameter counts when it cannot be analysed.
    A model without repeated blocks is traced and cut between the nodes of its graph."""
    from onegpu.planner.analysis import analyze
    from onegpu.planner.stages import balanced_cuts, flops_cuts
    from onegpu.runtime.advanced import first_sample, sequence_length

    blocks = repeated_blocks(model)
    if not blocks:  # no repeated blocks: cut the traced graph
        from onegpu.parallel.graph_stages import graph_cuts, trace
        from onegpu.parallel.pipeline import as_keywords

        graph = trace(model)
        if sample is None:
            raise UsageError("a model without repeated blocks is cut from a batch: pass its DataLoader to prepare()")
        keywords = sample if isinstance(sample, dict) else as_keywords(model, tuple(sample), {})
        return graph_cuts(graph, keywords, stages=stages)
    if sample is not None:
        try:
            config_only = hasattr(model, "config")
            profile = analyze(
                model, seq_len=sequence_length(sample), sample=None if config_only else first_sample(sample)
            )
        except UsageError:
            profile = None
        if profile is not None and len(profile.blocks) == len(blocks):
            return flops_cuts(profile, stages=stages)  # the cut the planner costed
    costs = [float(sum(p.numel() for p in b.parameters())) for b in blocks]
    rest = float(sum(p.numel() for p in model.parameters())) - sum(costs)
    return balanced_cuts(costs, stages=stages, first_extra=rest / 2, last_extra=rest / 2)


def _pipeline(
    model: nn.Module, plan: Plan, loaders: list[DataLoader], *, worker: Worker, optimizers, loss_fn
) -> nn.Module:
    """This worker's pipeline stage of ``model`` (built at the first batch)."""
    from torch.distributed.device_mesh import init_device_mesh

    from onegpu.parallel.pipeline import worker_stages
    from onegpu.runtime.pipelined import PipelinedModel

    _check_executable(plan)
    sample = _sample_slice(loaders[0], world_size=plan.dp) if loaders else None
    stages = plan.pp * len(worker_stages(plan.schedule, pp=plan.pp, rank=0))
    cuts = pipeline_cuts(model, stages=stages, sample=sample)
    # tensor-parallel ranks are nearest neighbours, pipeline stages next (inside a node), replicas outermost
    mesh = init_device_mesh(worker.device.type, (plan.dp, plan.pp, plan.tp), mesh_dim_names=("dp", "pp", "tp"))
    on_meta = _place(model, worker=worker)
    return PipelinedModel(
        model, plan=plan, worker=worker, cuts=cuts, mesh=mesh, optimizers=optimizers, on_meta=on_meta, loss_fn=loss_fn
    )


def _parallelize(model: nn.Module, plan: Plan, *, worker: Worker, loaders: list[DataLoader]):
    """Apply ``plan`` to ``model`` in place; returns the process group of the data-parallel replicas
    (None: every worker is one)."""
    # imported here: torch's FSDP/DTensor cost a second of start-up that a 1-worker job does not need
    from torch.distributed.device_mesh import init_device_mesh

    from onegpu.parallel.ddp import apply_ddp
    from onegpu.parallel.fsdp import apply_fsdp

    _check_executable(plan)
    if plan.tp > 1:
        return _tensor_parallel(model, plan, worker=worker, loaders=loaders)
    _checkpoint_blocks(model, plan)
    if worker.world_size == 1 or plan.sharding == "none":
        if is_on_meta(model):  # replicated: every worker holds it whole anyway
            materialize(model, device=worker.device)
        _place(model, worker=worker)
        if worker.world_size > 1:
            apply_ddp(model, device=worker.device)
        return None
    on_meta = _place(model, worker=worker)
    mesh = init_device_mesh(worker.device.type, (worker.world_size,))
    apply_fsdp(model, mesh=mesh, shard_parameters=plan.sharding == "parameters", offload=plan.offload == "parameters")
    if on_meta:
        materialize(model, device=worker.device)
    return None


def _place(model: nn.Module, *, worker: Worker) -> bool:
    """A real model moves to this worker's device with rank 0's values; a meta one stays, to be
    materialized once split. Returns whether it is on the meta device."""
    on_meta = is_on_meta(model)
    if not on_meta:
        model.to(worker.device)
        broadcast_from_main([*model.parameters(), *model.buffers()], worker=worker)
    return on_meta


def _checkpoint_blocks(model: nn.Module, plan: Plan) -> None:
    """Activation checkpointing of the first blocks, as many as ``plan`` says."""
    from onegpu.parallel.checkpointing import apply_activation_checkpointing

    if plan.activation_checkpointing != "none":
        blocks = repeated_blocks(model)
        apply_activation_checkpointing(blocks[: plan.checkpointed_blocks(len(blocks))])


def _tensor_parallel(model: nn.Module, plan: Plan, *, worker: Worker, loaders: list[DataLoader]):
    """Tensor parallelism inside each replica (neighbouring workers), data parallelism or FSDP across."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.device_mesh import init_device_mesh

    from onegpu.parallel.fsdp import apply_fsdp
    from onegpu.parallel.tensor_parallel import apply_tensor_parallel
    from onegpu.parallel.tp_structure import require_tensor_parallel

    if not loaders:
        raise UsageError(
            "tensor parallelism finds the model's structure from a batch: pass its DataLoader to prepare()"
        )
    structure = require_tensor_parallel(model, _sample_slice(loaders[0], world_size=plan.dp), tp=plan.tp)
    mesh = init_device_mesh(worker.device.type, (plan.dp, plan.tp), mesh_dim_names=("dp", "tp"))
    on_meta = _place(model, worker=worker)
    model.onegpu_fused_orders = apply_tensor_parallel(model, structure, mesh=mesh["tp"])
    model.onegpu_tensor_parallel = structure
    _checkpoint_blocks(model, plan)
    if plan.dp > 1 and plan.sharding == "none":
        # FSDP2's replicate warns on every step that a loss which is a view could be changed in place; ours is not
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        replicate(model, mesh=mesh["dp"])
    elif plan.dp > 1:
        apply_fsdp(
            model, mesh=mesh["dp"], shard_parameters=plan.sharding == "parameters", offload=plan.offload == "parameters"
        )
    if on_meta:
        materialize(model, device=worker.device)
    return mesh["dp"].get_group()
