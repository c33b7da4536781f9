"""Data-parallel communication of one step: gradient reduction and parameter gathering across replicas, and
what of it compute does not hide. ``step`` is the cost model's view of one step (planner/cost_model.py's _Step)."""

from __future__ import annotations

from onegpu.planner.gpu_efficiency import overlapped


def data_parallel_comm(step, *, shard_group: int, bucket_bytes: int) -> float:
    """Gradient reduction and parameter gathering across replicas, what of it compute does not hide: backward
    hides gradient reductions where the framework overlaps them, a block's compute the prefetched gathers."""
    plan, cluster, block, m, n = step.plan, step.cluster, step.block, step.plan.microbatches, sum(step.fullest)
    framework, compute_bytes = step.work.framework, step.work.profile.param_bytes
    dp, inside = plan.dp, plan.world_size <= cluster.devices_per_node  # replicas sit outermost
    grad_bytes = step.stage_params * compute_bytes
    ring = 2 * (dp - 1) / dp if dp > 1 else 0.0
    # compute that communication can hide behind; on a CPU "device" gloo runs on the same cores: none
    overlap = 0.0 if step.cpu else 1.0
    backward = overlap * m * n * step.micro_batch * block.bwd_flops / plan.tp / step.attainable
    backward *= framework.overlap_gradient_reduction
    if plan.sharding in ("none", "optimizer"):
        exposed_after = step.collective(ring * min(grad_bytes, bucket_bytes), dp, inside_node=inside)
        comm = overlapped(step.collective(ring * grad_bytes, dp, inside_node=inside), backward) + exposed_after
        if plan.sharding == "optimizer":  # ZeRO-1: gradients all-reduced as above, updated pieces all-gathered
            comm += step.collective(ring / 2 * grad_bytes, dp, inside_node=inside, ring=True)
    elif plan.sharding == "gradients":
        reduce_scatter = step.collective(ring / 2 * grad_bytes, dp, inside_node=inside, ring=True)
        all_gather = step.collective(ring / 2 * grad_bytes, dp, inside_node=inside, ring=True)
        comm = overlapped(reduce_scatter, backward) + all_gather
    else:  # parameters / hybrid: per block all-gathers (forward, backward) and a reduce-scatter
        comm = _sharded_comm(step, group=shard_group, inside=inside, overlap=overlap)
    # sharded gradients and parameters are copied into and out of flat communication buffers
    gathers = {"gradients": 1, "parameters": 2, "hybrid": 2}.get(plan.sharding, 0)
    if gathers:
        comm += m * (gathers + 1) * 2 * step.stage_params * compute_bytes / step.bandwidth
    return comm


def _sharded_comm(step, *, group: int, inside: bool, overlap: float) -> float:
    """FSDP/ZeRO-3: every micro-batch gathers each block for forward and again for backward, its gradients are
    reduce-scattered once per step; prefetched gathers hide under the previous block's compute."""
    plan, block, m, n = step.plan, step.block, step.plan.microbatches, sum(step.fullest)
    framework, compute_bytes = step.work.framework, step.work.profile.param_bytes
    shard_inside = inside or plan.sharding == "hybrid"
    pieces = framework.gathers_per_block  # each pays its ring latency
    volume = (group - 1) / group * block.params / plan.tp * compute_bytes
    gather = pieces * step.collective(volume / pieces, group, inside_node=shard_inside, ring=True)
    reduce = gather  # a reduce-scatter moves what an all-gather does
    hideable = 2 * gather + (reduce / m if framework.overlap_gradient_reduction else 0.0)
    hidden = overlap * step.block_time(recompute=False) if framework.prefetch_gathers else 0.0
    comm = m * n * overlapped(hideable, hidden) + gather
    if not framework.overlap_gradient_reduction:
        comm += n * reduce
    if plan.sharding == "hybrid" and plan.dp > group:
        replicas = plan.dp // group
        grads = step.stage_params * compute_bytes / group
        comm += step.collective(2 * (replicas - 1) / replicas * grads, replicas, inside_node=False)
    return comm
