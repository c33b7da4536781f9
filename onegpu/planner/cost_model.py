"""Time of one training step under a Plan, from the model's profile and the cluster's datasheet, and the
prediction that puts it beside the memory (planner/memory_model.py).

Time is physics: GEMMs at the device's peak (times an attainable fraction,
or bound by reading the weights from memory), elementwise work at memory bandwidth, collectives
with a latency-bandwidth model on the link they cross, pipeline bubbles per schedule.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from onegpu.plan import INTERLEAVED, Plan, Prediction
from onegpu.planner.cluster import Cluster, Link
from onegpu.planner.data_parallel import data_parallel_comm
from onegpu.planner.gpu_efficiency import (
    GEMM_EFFICIENCY,
    NETWORK_BUS_EFFICIENCY,
    NVLINK_BUS_EFFICIENCY,
    SCORE_BYTES_PER_PASS,
    UNFUSED_ELEMENTWISE_TRAFFIC,
    attention_efficiency,
    collective_time,
)
from onegpu.planner.memory_model import memory
from onegpu.planner.stages import worker_stage_blocks
from onegpu.planner.workload import (
    DDP_BUCKET_BYTES,
    MASTER_BYTES,
    Workload,
    is_cpu,
    micro_batch_size,
    shard_factors,
    tp_activation_share,
)

__all__ = ["Workload", "is_cpu", "memory", "predict", "recompute_time", "step_time"]

# A CPU "device" is measured by the matmul it runs, so its peak is already attainable.
CPU_GEMM_EFFICIENCY = 1.0
# Host link for offload: PCIe 4.0 x16 (32 GB/s per direction, about 25 usable), and the
# host's share of memory bandwidth for a CPU optimizer step, per device.
HOST_LINK = Link(bandwidth_gbps=25.0, latency_us=10.0)
HOST_OPTIMIZER_BYTES_PER_S = 10e9
# Launch (GPU) or eager dispatch (CPU) cost of one operator.
GPU_OP_OVERHEAD_S = 5e-6
CPU_OP_OVERHEAD_S = 20e-6
OPS_WHEN_UNKNOWN = 120  # forward + backward operators of a transformer block, when not counted


@dataclass(frozen=True)
class _Step:
    """What every part of a step's time depends on: the plan, the work, the cluster, and figures derived once."""

    plan: Plan
    work: Workload
    cluster: Cluster

    @property
    def cpu(self) -> bool:
        return is_cpu(self.cluster)

    @property
    def peak(self) -> float:
        device, precision = self.cluster.device, self.plan.precision
        return device.peak_flops(precision if precision in device.peak_tflops else "fp32")

    @property
    def attainable(self) -> float:
        return self.peak * (CPU_GEMM_EFFICIENCY if self.cpu else GEMM_EFFICIENCY)

    @property
    def attention_efficiency(self) -> float:
        """Of dense peak, what attention kernels reach on this device with the framework's kernel."""
        return attention_efficiency(self.cluster.device.name, hopper_kernel=self.work.framework.hopper_attention)

    @property
    def bandwidth(self) -> float:
        return self.cluster.device.memory_bandwidth_gbps * 1e9

    def collective(self, volume_bytes: float, group: int, *, inside_node: bool, ring: bool = False) -> float:
        """A collective over the node's links or the network, at the bus bandwidth NCCL achieves on a datasheet
        link (a measured link, ``local``, is already what is achieved)."""
        cluster = self.cluster
        link = cluster.intra_node if inside_node else cluster.inter_node
        datasheet = not self.cpu and cluster.name != "local"
        efficiency = (NVLINK_BUS_EFFICIENCY if inside_node else NETWORK_BUS_EFFICIENCY) if datasheet else 1.0
        return collective_time(volume_bytes, group, link, ring=ring and not self.cpu, efficiency=efficiency)

    @functools.cached_property
    def fullest(self) -> tuple[int, ...]:
        """The block counts of the stages of the worker that holds the most blocks."""
        return max(worker_stage_blocks(self.work.profile, pp=self.plan.pp, schedule=self.plan.schedule), key=sum)

    @property
    def block(self):
        prof = self.work.profile
        return prof.blocks[0] if prof.blocks else prof.rest

    @property
    def micro_batch(self) -> float:
        return micro_batch_size(self.plan, self.work.global_batch)

    @property
    def stage_params(self) -> float:
        return (sum(self.fullest) * self.block.params + self.work.profile.rest.params) / self.plan.tp

    def block_time(self, *, recompute: bool) -> float:
        """One micro-batch through one block, compiled when the plan compiles (as measured, else as eager)."""
        speed = self.work.compiled_block_time if self.plan.compile else None
        return self.part_time(self.block, recompute=recompute) * (speed or 1.0)

    @property
    def measured_scale(self) -> float:
        """On a CPU device whose block was timed: the measured block's time over the modelled one. GEMMs of the
        model's real (thin) shapes, the eager dispatch of its operators and its elementwise kernels on one core
        run far from a square matmul's rate; the head and embedding run the same kernels, so every part of the
        model is scaled alike."""
        if not self.cpu or self.work.measured_block is None:
            return 1.0
        seconds, samples = self.work.measured_block
        modelled = self.modelled_time(self.block, recompute=False) / self.micro_batch * samples * self.plan.tp
        return seconds / modelled if modelled > 0 else 1.0

    def part_time(self, part, *, recompute: bool) -> float:
        """One micro-batch's forward and backward through ``part`` (recomputing its forward, or not)."""
        return self.modelled_time(part, recompute=recompute) * self.measured_scale

    def modelled_time(self, part, *, recompute: bool) -> float:
        """``part_time`` from the device's peak, bandwidth and operator overhead alone."""
        b, tp, compute_bytes = self.micro_batch, self.plan.tp, self.work.profile.param_bytes
        passes = 4 / 3 if recompute else 1.0  # recomputation repeats the forward: a third of the work
        attention = b * part.attention_flops * passes / tp
        flops = b * (part.fwd_flops * (2 if recompute else 1) + part.bwd_flops) / tp - attention
        weight_reads = (4 if recompute else 3) * part.params / tp * compute_bytes
        attention_rate = self.peak * (CPU_GEMM_EFFICIENCY if self.cpu else self.attention_efficiency)
        gemm = max(flops / self.attainable, weight_reads / self.bandwidth) + attention / attention_rate
        # elementwise work: activations written in forward, read in backward, their gradients written and read
        share = tp_activation_share(tp, sequence_parallel=self.work.sequence_parallel)
        passes = 4.0  # (a CPU "device" is costed as measured: CPU_* figures)
        if not self.cpu:  # recomputation writes the forward's activations again; eager ops move more
            passes = 5.0 if recompute else 4.0
            passes *= 1.0 if self.work.framework.fused_elementwise else UNFUSED_ELEMENTWISE_TRAFFIC
        elementwise = passes * b * part.activation_bytes * share / self.bandwidth
        if part.attention_flops and not self.work.framework.flash_attention:
            prof = self.work.profile
            scores = b * (prof.num_heads or 0) / tp * prof.seq_len**2
            elementwise += (3 if recompute else 2) * SCORE_BYTES_PER_PASS * scores / self.bandwidth
        launches = (part.ops or OPS_WHEN_UNKNOWN) * (4 / 3 if recompute else 1)
        return gemm + elementwise + launches * (CPU_OP_OVERHEAD_S if self.cpu else GPU_OP_OVERHEAD_S)

    def selective_recompute_time(self) -> float:
        """Selective recomputation per micro-batch and block: cheap operators again (elementwise, no GEMM; a few % of
        a GPT's step, Korthikanti et al. 2022, table 4), forward and recomputation under a Python dispatch mode:
        one more dispatch per operator in each (bench/selective_recompute.py: 1.6x full's per operator on a CPU)."""
        block, b, kept = self.block, self.micro_batch, self.block.selective_activation_bytes or 0
        share = tp_activation_share(self.plan.tp, sequence_parallel=self.work.sequence_parallel)
        elementwise = 2 * b * max(block.activation_bytes - kept, 0) * share / self.bandwidth
        launches = max(2 * (block.ops or OPS_WHEN_UNKNOWN) / 3 - block.kept_ops, 0)  # the forward's, seen twice
        speed = (self.work.compiled_block_time if self.plan.compile else None) or 1.0
        return (elementwise + launches * (CPU_OP_OVERHEAD_S if self.cpu else GPU_OP_OVERHEAD_S)) * speed


def step_time(plan: Plan, work: Workload, cluster: Cluster) -> dict[str, float]:
    """Seconds per optimizer step, by kind."""
    step = _Step(plan, work, cluster)
    m = plan.microbatches
    stage, recompute, tp_comm = _stage_times(step)
    bubble, p2p = _pipeline_times(step, stage_micro=stage + tp_comm)
    optimizer, offload = _optimizer_times(step)
    return {
        "compute": m * (stage - recompute),
        "recompute": m * recompute,
        "pipeline_bubble": bubble,
        "tensor_parallel_comm": m * tp_comm,
        "pipeline_comm": m * p2p,
        "data_parallel_comm": data_parallel_comm(
            step, shard_group=shard_factors(plan, cluster)[0], bucket_bytes=DDP_BUCKET_BYTES
        ),
        "optimizer": optimizer,
        "offload": offload,
    }


def recompute_time(plan: Plan, work: Workload, cluster: Cluster) -> float:
    """Seconds a micro-batch of the fullest stage recomputes: what checkpointing changes (and the bubble with it)."""
    return _stage_times(_Step(plan, work, cluster))[1]


def _stage_times(step: _Step) -> tuple[float, float, float]:
    """One micro-batch on the fullest stage: its compute, the part of it that recomputes, and the exposed
    tensor-parallel communication (per block, 4 all-reduce-sized collectives of its boundary: all-reduces, or
    all-gathers and reduce-scatters under sequence parallelism; a recomputed forward repeats its 2), none where
    the framework overlaps them."""
    plan, block, n = step.plan, step.block, sum(step.fullest)
    c = sum(plan.checkpointed_blocks(size) for size in step.fullest)  # a number of blocks is per stage
    block_time, recomputed = step.block_time(recompute=False), step.block_time(recompute=True)
    rest = step.part_time(step.work.profile.rest, recompute=False)
    compute = c * recomputed + (n - c) * block_time + rest
    recompute = c * (recomputed - block_time)
    if plan.selective:
        recompute = n * step.selective_recompute_time()
        compute += recompute
    tp_comm = 0.0
    if plan.tp > 1:
        volume = 2 * (plan.tp - 1) / plan.tp * step.micro_batch * block.boundary_bytes
        repeated = 0 if step.cpu else 2 * c
        tp_comm = (4 * n + repeated) * step.collective(volume, plan.tp, inside_node=True, ring=True)
        if step.work.framework.overlap_tensor_parallel:  # hidden under the GEMMs that produce and consume them
            tp_comm = max(tp_comm - compute, 0.0)
    return compute, recompute, tp_comm


def _pipeline_times(step: _Step, *, stage_micro: float) -> tuple[float, float]:
    """The bubble ((pp - 1) micro-batch slots, fewer for interleaved and zero-bubble schedules) and the
    activations sent between stages, per micro-batch."""
    plan, cluster = step.plan, step.cluster
    virtual = 2 if plan.schedule in INTERLEAVED else 1
    bubble = (plan.pp - 1) / virtual
    if plan.schedule == "zero-bubble":  # Qi et al. 2024: weight gradients fill the bubble, about a third is left
        bubble /= 3
    p2p = 0.0
    if plan.pp > 1:
        inside = plan.tp * plan.pp <= cluster.devices_per_node
        p2p = (
            2 * virtual * step.collective(step.micro_batch * step.block.boundary_bytes / plan.tp, 2, inside_node=inside)
        )
    return bubble * (stage_micro + p2p), p2p


def _optimizer_times(step: _Step) -> tuple[float, float]:
    """The optimizer step (memory bound, on the device or the host) and the transfers offload adds."""
    plan, work = step.plan, step.work
    shard = shard_factors(plan, step.cluster)[2]
    state_bytes = step.stage_params / shard * MASTER_BYTES * (2 + work.optimizer_slots) * 2
    optimizer, offload = state_bytes / step.bandwidth, 0.0
    host = HOST_LINK.bandwidth_gbps * 1e9
    if plan.offload in ("optimizer", "parameters"):
        optimizer = state_bytes / HOST_OPTIMIZER_BYTES_PER_S
        offload = 2 * step.stage_params / shard * MASTER_BYTES / host
    if plan.offload == "parameters":
        offload += 2 * plan.microbatches * step.stage_params / shard * work.profile.param_bytes / host
    return optimizer, offload


def predict(
    plan: Plan, work: Workload, cluster: Cluster, *, memory_breakdown: dict[str, int] | None = None
) -> Prediction:
    """The plan's step time and memory; ``memory_breakdown``: its ``memory()``, when already computed."""
    mem = memory(plan, work, cluster) if memory_breakdown is None else memory_breakdown
    times = step_time(plan, work, cluster)
    step = sum(times.values())
    prof = work.profile
    tokens = work.global_batch * prof.seq_len
    model_flops = prof.flops_per_sample * work.global_batch
    tflops = model_flops / step / plan.world_size / 1e12
    peak = cluster.device.peak_flops(plan.precision if plan.precision in cluster.device.peak_tflops else "fp32")
    return Prediction(
        step_time_s=step,
        tokens_per_s=tokens / step,
        tflops_per_device=tflops,
        mfu=tflops * 1e12 / peak,
        memory_per_device_bytes=sum(mem.values()),
        memory_breakdown=mem,
        time_breakdown=times,
    )
