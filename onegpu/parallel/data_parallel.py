"""Data parallelism over the mesh's data-parallel dimension: DDP's reducer or FSDP2.

Replicated fp32 plans of a whole model (no pipeline, no tensor parallelism, no micro-batches) run on
DDP's C++ reducer (:mod:`onegpu.parallel.replicated`: buckets reduced while backward runs, plain tensors
for the optimizer; on gloo it hides the reductions FSDP2 waits for). Otherwise each block is one unit,
then the rest of the module (its root). Other replicated plans use FSDP2's ``replicate`` (every replica
holds the whole module; gradients are all-reduced per unit while backward runs), ZeRO-1 too
(``sharding="optimizer"``: only its optimizer state is split, by :mod:`onegpu.parallel.optimizer_state`);
sharded plans use ``fully_shard``: ZeRO-2 (``sharding="gradients"``) keeps the parameters gathered from
forward to backward, ZeRO-3 (``"parameters"``) gathers them per block and frees them again, and hybrid
sharding does so over a 2D mesh (HSDP: shard inside groups of ``plan.shard_group`` replicas, replicate
across them). ``offload="parameters"`` keeps the parameters (or shards) in host memory.
Mixed precision is FSDP2's policy on the same units (:mod:`onegpu.parallel.mixed_precision`), at
degree 1 where a plan has no data parallelism.

Replicas SUM their gradients: each replica's loss is already its share of the global batch
(:mod:`onegpu.runtime.loss_weighting`), the one rule every plan follows.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

from onegpu.errors import UsageError
from onegpu.parallel.mixed_precision import cast_shape_only, is_mixed, mixed_precision_policy, reshard_after_evaluation
from onegpu.parallel.replicated import apply_replicated
from onegpu.plan import Plan


def apply_data_parallel(
    module: nn.Module,
    *,
    mesh: DeviceMesh,
    plan: Plan,
    blocks: list[nn.Module],
    ignored: set[nn.Parameter] | None = None,
    outputs_in_fp32: bool = True,
) -> None:
    """Make ``module`` (a model, or a pipeline stage) data parallel over ``mesh``, in place: ``blocks`` are its
    units; ``ignored`` parameters are left to another unit (a stage sharing modules with another). Under mixed
    precision ``module``'s outputs leave in fp32 unless ``outputs_in_fp32=False`` (a stage's activations)."""
    if not any(p.requires_grad for p in module.parameters()):  # nothing to train: nothing to synchronise
        module.register_forward_pre_hook(_refuse_unfrozen)
        return
    from torch.distributed._composable.replicate_with_fsdp import replicate

    # FSDP2 warns on every step that a loss which is a view could be changed in place; ours is not
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if _on_ddp(plan) and not ignored:
        apply_replicated(module, mesh=mesh)  # DDP's reducer: its buckets' reductions overlap backward
        return
    policy = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if plan.offload == "parameters" else OffloadPolicy()
    inner = mixed_precision_policy(plan.precision, outputs_in_fp32=False)
    outer = mixed_precision_policy(plan.precision, outputs_in_fp32=outputs_in_fp32)
    # ZeRO-1's optimizer state: onegpu.parallel.optimizer_state; at degree 1 there is nothing to shard
    if plan.sharding in ("none", "optimizer") or mesh.size() == 1:
        for block in blocks:
            replicate(block, mesh=mesh, offload_policy=policy, mp_policy=inner)
        replicate(module, mesh=mesh, offload_policy=policy, ignored_params=ignored, mp_policy=outer)
    else:
        shard = plan.sharding in ("parameters", "hybrid")
        for index, block in enumerate(blocks):
            # the last block's parameters are needed again at once by backward: keep them gathered
            reshard = shard and index < len(blocks) - 1
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, offload_policy=policy, mp_policy=inner)
        fully_shard(module, mesh=mesh, reshard_after_forward=shard, offload_policy=policy, ignored_params=ignored,
                    mp_policy=outer)  # fmt: skip
    for unit in module.modules():
        if isinstance(unit, FSDPModule):  # each replica's loss is its share of the global batch: sum
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    if is_mixed(plan.precision):
        reshard_after_evaluation(module)
        cast_shape_only(module, plan.precision)  # a pipeline stage's modules run for their outputs' shapes


def _on_ddp(plan: Plan) -> bool:
    """Replicated fp32 plans of a whole model, one forward per backward (DDP reduces a gradient once per backward:
    micro-batches of one call are FSDP2's); mixed precision is FSDP2's policy."""
    return (
        plan.sharding == "none"
        and plan.precision == "fp32"
        and plan.offload != "parameters"
        and plan.tp == plan.pp == plan.microbatches == 1
    )


def _refuse_unfrozen(module: nn.Module, args) -> None:
    if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        raise UsageError(
            "a parameter was unfrozen after onegpu.prepare(): set requires_grad before calling prepare, "
            "so that its gradients are summed across workers"
        )
