"""Execute a Plan on this worker: build its layout from the plan and the model alone.

Every plan the planner proposes runs; ``check_executable`` refuses, in one line, the one combination a
hand-written plan can ask for that torch cannot build (an interleaved schedule over FSDP2-sharded stages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from onegpu.errors import UsageError
from onegpu.launch.process_group import Worker, collective_timeout, join_alone
from onegpu.parallel.batch_norm import refuse_micro_batches
from onegpu.parallel.layouts import device_mesh, parallelize
from onegpu.parallel.materialize import is_on_meta, materialize
from onegpu.parallel.mixed_precision import check_precision, is_mixed
from onegpu.parallel.optimizer_state import apply_optimizer_state
from onegpu.plan import INTERLEAVED, Plan
from onegpu.runtime.accumulation import GradientAccumulation
from onegpu.runtime.call_slicing import CallSlicer, attach_call_slicing
from onegpu.runtime.collectives import broadcast_from_main
from onegpu.runtime.data import GlobalBatchLoader
from onegpu.runtime.gather import use_replica_group
from onegpu.runtime.loss_weighting import GlobalBatchHooks
from onegpu.runtime.micro_batches import run_as_micro_batches
from onegpu.runtime.optimizer import parameter_names, repoint, stop_for_resize_at_step_boundary
from onegpu.runtime.user_loss import attach_loss_fn
from onegpu.runtime.watchdog import Watchdog, process_watchdog


def check_executable(plan: Plan) -> None:
    if plan.schedule in INTERLEAVED and plan.sharding in ("gradients", "parameters", "hybrid"):
        raise UsageError(
            f"the {plan.schedule} schedule runs two stages per worker, which FSDP2 cannot shard (sharding="
            f"{plan.sharding!r}): use sharding 'none' or 'optimizer' with it, or the gpipe or 1f1b schedule"
        )


@dataclass(frozen=True)
class TrainingObjects:
    """What the user gave ``prepare``, sorted: the one model, its optimizers, its data loaders."""

    objects: tuple[Any, ...]
    model: nn.Module
    optimizers: tuple[torch.optim.Optimizer, ...]
    loaders: tuple[DataLoader, ...]

    @classmethod
    def sort(cls, objects: tuple[Any, ...]) -> TrainingObjects:
        models = [o for o in objects if isinstance(o, nn.Module)]
        if len(models) != 1:
            raise UsageError(f"onegpu.prepare() takes exactly one model (an nn.Module), got {len(models)}")
        for kind, prepared in (
            ("model", [o for o in objects if hasattr(o, "onegpu_plan")]),
            ("DataLoader", [o for o in objects if isinstance(o, GlobalBatchLoader)]),
        ):  # prepared once is not prepared again: its parallel wrappers would stack
            if prepared:
                raise UsageError(
                    f"this {kind} was already prepared by onegpu.prepare(): call prepare once and use the objects "
                    f"it returned (to prepare anew, pass newly built ones)"
                )
        return cls(
            objects=objects,
            model=models[0],
            optimizers=tuple(o for o in objects if isinstance(o, torch.optim.Optimizer)),
            loaders=tuple(o for o in objects if isinstance(o, DataLoader)),
        )


def replica_slice(plan: Plan, *, worker: Worker) -> tuple[int, int]:
    """Which slice of the batch this worker loads, and of how many: its data-parallel replica's."""
    return worker.rank // plan.replica_size, plan.dp


def sliced_loaders(given: TrainingObjects, plan: Plan, *, worker: Worker) -> list[Any]:
    """The objects with each DataLoader replaced by one that loads this worker's slice of every batch."""
    shard = replica_slice(plan, worker=worker)
    return [GlobalBatchLoader(o, worker=worker, shard=shard) if isinstance(o, DataLoader) else o for o in given.objects]


def execute(
    plan: Plan,
    given: TrainingObjects,
    *,
    worker: Worker,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    count_items: Callable[..., Any] | None = None,
) -> list[Any]:
    """Build ``plan``'s layout on this worker; returns the objects as the user's loop uses them, in order."""
    check_executable(plan)
    if plan.world_size != worker.world_size:
        raise UsageError(
            f"the plan uses {plan.world_size} workers but this job has {worker.world_size}: "
            f"plan for {worker.world_size} workers, or run with --workers {plan.world_size}"
        )
    check_precision(plan.precision, device=worker.device)
    model = given.model
    _check_fits(plan, model)
    if plan.pp > 1 or plan.microbatches > 1:
        refuse_micro_batches(model)
    names = [parameter_names(model, optimizer) for optimizer in given.optimizers]
    prepared = sliced_loaders(given, plan, worker=worker)
    mesh = device_mesh(plan, worker.device) if worker.world_size > 1 else None
    watchdog = process_watchdog(rank=worker.rank, timeout_s=collective_timeout()) if mesh is not None else None
    on_meta = _place(model, plan, worker=worker)
    if plan.pp > 1:
        from onegpu.runtime.pipelined import parallelize_pipeline

        parallelize_pipeline(
            model, plan, mesh=mesh, worker=worker, on_meta=on_meta, loss_fn=loss_fn, watchdog=watchdog,
            count_items=count_items,
        )  # fmt: skip
    else:
        parallelize(model, plan, mesh=mesh or _precision_mesh(plan, worker), device=worker.device, on_meta=on_meta)
        if loss_fn is not None:
            attach_loss_fn(model, loss_fn)
        if mesh is not None or plan.microbatches > 1:
            _hook_calls(
                model,
                plan,
                mesh=mesh,
                worker=worker,
                watchdog=watchdog,
                optimizers=given.optimizers,
                count_items=count_items,
            )
    use_replica_group(mesh["dp"].get_group() if mesh is not None and plan.dp > 1 else None)
    for optimizer, groups in zip(given.optimizers, names):
        repoint(optimizer, model, groups)
        apply_optimizer_state(optimizer, plan, group=mesh["dp"].get_group() if mesh is not None else None)
        _watch_steps(optimizer, watchdog)
    if given.optimizers:  # the last optimizer's step ends a training step
        stop_for_resize_at_step_boundary(model, given.optimizers[-1], worker=worker)
    if plan.precision == "fp16":  # accelerators only (check_precision): these lines have not run on a GPU yet
        from onegpu.runtime.loss_scale import DynamicLossScale

        DynamicLossScale(model, given.optimizers)
    model.onegpu_plan = plan
    return prepared


def _precision_mesh(plan: Plan, worker: Worker):
    """One worker under mixed precision: a mesh of itself alone, for the units that carry the policy."""
    if not is_mixed(plan.precision):
        return None
    join_alone(worker.device)
    return device_mesh(plan, worker.device)


def _hook_calls(model: nn.Module, plan: Plan, *, mesh, worker: Worker, watchdog, optimizers, count_items) -> None:
    """The hooks on the model's calls: a global batch built in the loop is sliced first, then each slice's loss
    is weighted; gradients accumulated over several calls are reduced once per optimizer step. With micro-batches,
    a training call runs them all, forward and backward, and reduces once."""
    group = mesh["dp"].get_group() if mesh is not None and plan.dp > 1 else None
    weighting: list[GlobalBatchHooks] = []

    def weight_losses() -> None:
        weighting.append(
            GlobalBatchHooks(model, group=group, device=worker.device, watchdog=watchdog, count_items=count_items)
        )

    slicer = None
    if group is None:
        weight_losses()
    else:
        slicer = CallSlicer(replica=replica_slice(plan, worker=worker)[0], replicas=plan.dp, group=group, worker=worker)
        model.__dict__["onegpu_call_slicer"] = slicer  # its random streams' position is saved with the state
        attach_call_slicing(model, slicer, between=weight_losses, watchdog=watchdog)
    if plan.microbatches > 1:
        run_as_micro_batches(
            model, microbatches=plan.microbatches, group=group, device=worker.device, slicer=slicer,
            weighting=weighting[0], watchdog=watchdog, count_items=count_items,
        )  # fmt: skip
    elif group is not None and optimizers:
        GradientAccumulation(model, optimizers)


def _check_fits(plan: Plan, model: nn.Module) -> None:
    """A plan fitted to another model (a JSON file of another run, say) is refused before anything changes."""
    if plan.blocks is None:
        return
    try:
        count = len(model.get_submodule(plan.blocks))
    except (AttributeError, TypeError):
        count = 0
    cuts = () if plan.stages is None or plan.stages.traced else plan.stages.cuts
    if count == 0 or any(cut >= count for cut in cuts):
        raise UsageError(
            f"the plan was made for another model (its blocks at {plan.blocks!r}, cut at {list(cuts)}): "
            f"plan for this {type(model).__name__}, or pass a plan without a layout for prepare() to fit"
        )


def _place(model: nn.Module, plan: Plan, *, worker: Worker) -> bool:
    """A real model moves to this worker's device with rank 0's values; a meta one stays, to be materialized
    once split (replicated plans materialize it whole at once). Returns whether it is still on the meta device."""
    if is_on_meta(model) and plan.sharding in ("none", "optimizer") and plan.tp == 1 and plan.pp == 1:
        materialize(model, device=worker.device)
    on_meta = is_on_meta(model)
    if not on_meta:
        model.to(worker.device)
        broadcast_from_main([*model.parameters(), *model.buffers()], worker=worker)
    return on_meta


def _watch_steps(optimizer: torch.optim.Optimizer, watchdog: Watchdog | None) -> None:
    if watchdog is not None:
        optimizer.register_step_pre_hook(lambda *_: watchdog.enter("optimizer.step"))
        optimizer.register_step_post_hook(lambda *_: watchdog.leave())
