"""One function per layout, each built on the one (dp, pp, tp) device mesh of a plan.

``parallelize`` picks the function for a plan without a pipeline: data parallelism (replicated or
sharded, :mod:`data_parallel`), or tensor parallelism inside each replica with data parallelism
across. Pipelines are built by ``onegpu.runtime.pipelined.parallelize_pipeline`` from the same
pieces, per stage. Every function reads the plan and the model, nothing else.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from onegpu.parallel.batch_norm import apply_global_batch_norm
from onegpu.parallel.blocks import blocks_at
from onegpu.parallel.checkpointing import checkpoint_blocks
from onegpu.parallel.compile import apply_compile
from onegpu.parallel.data_parallel import apply_data_parallel
from onegpu.parallel.materialize import materialize
from onegpu.parallel.mixed_precision import is_mixed
from onegpu.parallel.tensor_parallel import apply_tensor_parallel
from onegpu.plan import MESH_DIMS, Plan

HYBRID_DIMS = ("dp_replicate", "dp_shard")


def device_mesh(plan: Plan, device: torch.device) -> DeviceMesh:
    """The plan's mesh: tensor-parallel ranks are nearest neighbours, pipeline stages next (inside a node),
    data-parallel replicas outermost. Under hybrid sharding ``dp`` is the flattened pair ``(dp_replicate,
    dp_shard)``, the groups of ``plan.shard_group`` neighbouring replicas that shard together."""
    if plan.sharding != "hybrid":
        return init_device_mesh(device.type, (plan.dp, plan.pp, plan.tp), mesh_dim_names=MESH_DIMS)
    sizes = (plan.dp // plan.shard_group, plan.shard_group, plan.pp, plan.tp)
    mesh = init_device_mesh(device.type, sizes, mesh_dim_names=(*HYBRID_DIMS, *MESH_DIMS[1:]))
    mesh[HYBRID_DIMS]._flatten("dp")
    return mesh


def data_parallel_mesh(mesh: DeviceMesh, plan: Plan) -> DeviceMesh:
    """Where FSDP2 runs: the replicas (1D), or under hybrid sharding the (replicate, shard) 2D mesh."""
    return mesh[HYBRID_DIMS] if plan.sharding == "hybrid" else mesh["dp"]


def parallelize(model: nn.Module, plan: Plan, *, mesh: DeviceMesh | None, device: torch.device, on_meta: bool) -> None:
    """Apply a plan without a pipeline to ``model``, in place (one worker: no mesh, only checkpointing and compile,
    or a mesh of one worker for mixed precision); a meta-built model is materialized once split."""
    apply_global_batch_norm(model, group=mesh["dp"].get_group() if mesh is not None and plan.dp > 1 else None)
    if mesh is None:
        _prepared_blocks(model, plan)
    elif plan.tp > 1:
        parallelize_tensor_parallel(model, plan, mesh=mesh)
    else:
        parallelize_data_parallel(model, plan, mesh=mesh)
    if on_meta:
        materialize(model, device=device)


def parallelize_data_parallel(model: nn.Module, plan: Plan, *, mesh: DeviceMesh) -> None:
    """Every worker a replica: the model whole (``sharding="none"``) or sharded (ZeRO-2/3) over the replicas."""
    blocks = _prepared_blocks(model, plan)
    if plan.dp > 1 or is_mixed(plan.precision):  # at degree 1 the units carry mixed precision
        apply_data_parallel(model, mesh=data_parallel_mesh(mesh, plan), plan=plan, blocks=blocks)


def parallelize_tensor_parallel(model: nn.Module, plan: Plan, *, mesh: DeviceMesh) -> None:
    """Each replica's blocks split over its ``tp`` neighbouring workers; replicas data parallel across."""
    count = len(blocks_at(model, plan.blocks))
    names = [f"{plan.blocks}.{b}" for b in range(count)]
    model.onegpu_split_changes = apply_tensor_parallel(
        model, plan.tensor_parallel, mesh=mesh["tp"], blocks=names, first=names[0], last=names[-1]
    )
    blocks = _prepared_blocks(model, plan)
    if plan.dp > 1 or is_mixed(plan.precision):
        apply_data_parallel(model, mesh=data_parallel_mesh(mesh, plan), plan=plan, blocks=blocks)


def _prepared_blocks(model: nn.Module, plan: Plan) -> list[nn.Module]:
    """The model's blocks, the first ``plan.checkpointed_blocks`` of them checkpointed (all, selectively, under
    selective recomputation), then all compiled if the plan compiles (torchtitan's order: tensor parallelism,
    checkpointing, compile, then data parallelism)."""
    blocks = blocks_at(model, plan.blocks) if plan.blocks else []
    checkpoint_blocks(blocks, plan)
    if plan.compile:
        apply_compile(blocks)
    return blocks
