"""Memory and time of one training step under a Plan, from the model's profile and the cluster's datasheet.

Memory is conservative: every byte a worker holds at its peak (states, the framework's own
buffers, activations of all micro-batches in flight, the recomputation peak), plus a fixed
runtime overhead. Time is physics: GEMMs at the device's peak (times an attainable fraction,
or bound by reading the weights from memory), elementwise work at memory bandwidth, collectives
with a latency-bandwidth model on the link they cross, pipeline bubbles per schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onegpu.plan import INTERLEAVED, Plan, Prediction
from onegpu.planner.cluster import Cluster, Link
from onegpu.planner.profile import ModelProfile
from onegpu.planner.stages import worker_stage_blocks

# Fraction of dense peak that GEMMs of transformer shapes reach in training (cuBLAS/rocBLAS reach
# 70-80% on large square bf16 matrices, less on the thinner projections of real layers).
GEMM_EFFICIENCY = 0.70
# Flash attention reaches less: FlashAttention-2 reports 50-73% of A100 peak forward, less backward.
ATTENTION_EFFICIENCY = 0.50
# A CPU "device" is measured by the matmul it runs, so its peak is already attainable.
CPU_GEMM_EFFICIENCY = 1.0
# What the runtime holds besides tensors: CUDA/ROCm context, NCCL and cuBLAS workspaces.
GPU_RUNTIME_BYTES = 1.5e9
# A CPU worker: Python with torch, transformers and onegpu imported and a gloo process group joined (0.35 GB
# resident), and what inductor adds once it has compiled a block (0.11 GB): bench/local_runtime_bytes.py.
CPU_RUNTIME_BYTES = 0.35e9
CPU_COMPILE_BYTES = 0.11e9
# Allocator fragmentation on dynamic memory (activations, gathered parameters). On a CPU "device"
# the peak resident set also keeps what glibc's per-thread arenas freed but did not return.
FRAGMENTATION = 1.10
CPU_FRAGMENTATION = 1.25
# PyTorch's multi-tensor (foreach) optimizers allocate temporaries of about two parameter-sized
# tensors per step (e.g. Adam's denominator and update).
OPTIMIZER_WORKSPACE_SLOTS = 2
# Host link for offload: PCIe 4.0 x16 (32 GB/s per direction, about 25 usable), and the
# host's share of memory bandwidth for a CPU optimizer step, per device.
HOST_LINK = Link(bandwidth_gbps=25.0, latency_us=10.0)
HOST_OPTIMIZER_BYTES_PER_S = 10e9
# Launch (GPU) or eager dispatch (CPU) cost of one operator.
GPU_OP_OVERHEAD_S = 5e-6
CPU_OP_OVERHEAD_S = 20e-6
OPS_WHEN_UNKNOWN = 120  # forward + backward operators of a transformer block, when not counted
DDP_BUCKET_BYTES = 25 * 2**20
MASTER_BYTES = 4  # parameters, gradients and optimizer states are kept in fp32


@dataclass(frozen=True)
class Workload:
    """What is trained: the model's profile, the global batch, the optimizer's state per parameter."""

    profile: ModelProfile
    global_batch: int
    optimizer_slots: int = 2  # AdamW
    sequence_parallel: bool = True  # under tensor parallelism, norms and residuals split by position too
    # a compiled block's forward and backward time over the eager one's, measured on the job's devices
    # (planner/compile_measure.py); None: not measured, and a compiled plan is costed as eager
    compiled_block_time: float | None = None
    # (seconds, samples): one eager block's forward and backward as measured on the job's CPU device for that
    # many samples (planner/compile_measure.py); None: not measured, CPU time is costed from the datasheet alone
    measured_block: tuple[float, int] | None = None


def is_cpu(cluster: Cluster) -> bool:
    return cluster.device.name.startswith("cpu")


def micro_batch_size(plan: Plan, global_batch: int) -> float:
    return global_batch / (plan.dp * plan.microbatches)


def in_flight(plan: Plan, *, worker: int = 0) -> float:
    """Micro-batches whose activations pipeline ``worker`` holds at its peak: every one under GPipe,
    under 1F1B one per stage still ahead of it (Narayanan et al. 2021)."""
    if plan.pp == 1:
        return 1
    if plan.schedule == "gpipe":
        return plan.microbatches
    held = min(plan.pp - worker, plan.microbatches)
    if plan.schedule in INTERLEAVED:  # Narayanan et al. 2021, section 2.2.2: (1 + (p-1)/(p*v)) more
        return held * (1 + (plan.pp - 1) / (plan.pp * 2))
    return held


def hybrid_shard_group(plan: Plan, cluster: Cluster) -> int:
    """The replicas that shard together under hybrid sharding: as many as one node holds (the largest divisor
    of ``dp`` that fits a node), so parameters are gathered over the node's links only."""
    per_node = max(1, cluster.devices_per_node // (plan.tp * plan.pp))
    return max(g for g in range(1, min(plan.dp, per_node) + 1) if plan.dp % g == 0)


def shard_factors(plan: Plan, cluster: Cluster) -> tuple[int, int, int]:
    """By how many devices parameters, gradients and optimizer states are divided (ZeRO levels)."""
    dp = plan.dp
    if plan.sharding == "hybrid":
        inside = plan.shard_group or hybrid_shard_group(plan, cluster)
        return inside, inside, inside
    return {
        "none": (1, 1, 1),
        "optimizer": (1, 1, dp),
        "gradients": (1, dp, dp),
        "parameters": (dp, dp, dp),
    }[plan.sharding]


def tp_activation_share(tp: int, *, sequence_parallel: bool) -> float:
    """The share of a block's activations each of ``tp`` tensor-parallel ranks holds and computes: all
    split with sequence parallelism; without it its norms, residuals and inputs stay whole, 10 of its 34
    bytes per token and hidden unit (Korthikanti et al. 2022, table 2)."""
    if tp == 1 or sequence_parallel:
        return 1.0 / tp
    return (10 + 24 / tp) / 34


def vocabulary_padding(prof: ModelProfile, *, tp: int) -> float:
    """Parameters a tensor-parallel worker holds beyond its share: a vocabulary ``tp`` does not divide is
    padded to a multiple of it, so the embedding and the head (counted untied) each hold up to one more row."""
    if tp == 1 or not prof.vocab_size or not prof.hidden_size:
        return 0.0
    return 2 * (-(-prof.vocab_size // tp) - prof.vocab_size / tp) * prof.hidden_size


def memory(plan: Plan, work: Workload, cluster: Cluster) -> dict[str, int]:
    """Peak bytes per device, by kind."""
    prof, tp = work.profile, plan.tp
    workers = worker_stage_blocks(prof, pp=plan.pp, schedule=plan.schedule)
    n = max(sum(stages) for stages in workers)
    block = prof.blocks[0] if prof.blocks else prof.rest
    stage_params = (n * block.params + prof.rest.params) / tp + vocabulary_padding(prof, tp=tp)
    compute_bytes = prof.param_bytes
    sp, sg, so = shard_factors(plan, cluster)
    sharded_params = plan.sharding in ("parameters", "hybrid")

    params = stage_params * MASTER_BYTES / sp
    grads = stage_params * MASTER_BYTES / sg
    optimizer = stage_params * MASTER_BYTES * work.optimizer_slots / so
    framework = 0.0
    if compute_bytes != MASTER_BYTES and not sharded_params:
        framework += stage_params * compute_bytes  # the low-precision working copy
    if sharded_params:  # gathered blocks: the current one and the prefetched next, plus their gradients
        framework += 2 * block.params / tp * (compute_bytes + MASTER_BYTES) + prof.rest.params / tp * compute_bytes
    elif plan.sharding == "none" and plan.dp > 1:
        framework += stage_params * MASTER_BYTES  # DDP's gradient buckets
    else:  # two flat buckets, never larger than the gradients they hold
        framework += 2 * min(DDP_BUCKET_BYTES, stage_params * MASTER_BYTES)
    workspace = stage_params * MASTER_BYTES * OPTIMIZER_WORKSPACE_SLOTS / so
    if is_cpu(cluster):
        pass  # a CPU device's host memory is its own memory: offloading frees nothing
    elif plan.offload == "optimizer":
        optimizer = workspace = 0.0
    elif plan.offload == "parameters":
        params = grads = optimizer = workspace = 0.0
    if plan.pp == 1 and plan.microbatches > 1 and sg > 1:  # accumulated whole on the device, reduced once per call
        grads = stage_params * MASTER_BYTES

    b = micro_batch_size(plan, work.global_batch)
    block_activation = block.activation_bytes * tp_activation_share(tp, sequence_parallel=work.sequence_parallel)
    head = prof.rest.activation_bytes  # the logits are gathered whole

    def held(worker: int) -> float:
        """One micro-batch's activations on ``worker`` (the last one computes the head), times those in flight."""
        checkpointed = [plan.checkpointed_blocks(size) for size in workers[worker]]
        per_micro = sum(c * block.boundary_bytes + (size - c) * block_activation
                        for size, c in zip(workers[worker], checkpointed))  # fmt: skip
        return in_flight(plan, worker=worker) * (per_micro + (head if worker == plan.pp - 1 else 0.0))

    recompute_peak = block_activation if plan.checkpointed_blocks(n) else 0.0
    activations = b * (max(held(w) for w in range(plan.pp)) + recompute_peak + block_activation)
    runtime = CPU_RUNTIME_BYTES + CPU_COMPILE_BYTES * plan.compile if is_cpu(cluster) else GPU_RUNTIME_BYTES
    fragmentation = CPU_FRAGMENTATION if is_cpu(cluster) else FRAGMENTATION
    return {
        "parameters": int(params),
        "gradients": int(grads),
        "optimizer": int(optimizer),
        "optimizer_workspace": int(workspace),
        "framework_buffers": int(framework * fragmentation),
        "activations": int(activations * fragmentation),
        "runtime": int(runtime),
    }


def _collective(volume_bytes: float, group: int, link: Link) -> float:
    """A ring-bandwidth, tree-latency collective moving ``volume_bytes`` per device."""
    if group <= 1:
        return 0.0
    return volume_bytes / (link.bandwidth_gbps * 1e9) + 2 * math.log2(group) * link.latency_us * 1e-6


def _dp_link(plan: Plan, cluster: Cluster) -> Link:
    """Data-parallel peers sit outermost: they cross nodes as soon as the job spans nodes."""
    return cluster.inter_node if plan.world_size > cluster.devices_per_node else cluster.intra_node


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
    def bandwidth(self) -> float:
        return self.cluster.device.memory_bandwidth_gbps * 1e9

    @property
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
        attention_rate = self.peak * (CPU_GEMM_EFFICIENCY if self.cpu else ATTENTION_EFFICIENCY)
        gemm = max(flops / self.attainable, weight_reads / self.bandwidth) + attention / attention_rate
        # elementwise work: activations written in forward, read in backward, their gradients written and read
        share = tp_activation_share(tp, sequence_parallel=self.work.sequence_parallel)
        elementwise = 4 * b * part.activation_bytes * share / self.bandwidth
        launches = (part.ops or OPS_WHEN_UNKNOWN) * (4 / 3 if recompute else 1)
        return gemm + elementwise + launches * (CPU_OP_OVERHEAD_S if self.cpu else GPU_OP_OVERHEAD_S)


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
        "data_parallel_comm": _data_parallel_comm(step),
        "optimizer": optimizer,
        "offload": offload,
    }


def _stage_times(step: _Step) -> tuple[float, float, float]:
    """One micro-batch on the fullest stage: its compute, the part of it that recomputes, and the exposed
    tensor-parallel communication (4 all-reduce-sized collectives of each block's boundary)."""
    plan, block, n = step.plan, step.block, sum(step.fullest)
    c = sum(plan.checkpointed_blocks(size) for size in step.fullest)  # a number of blocks is per stage
    block_time, recomputed = step.block_time(recompute=False), step.block_time(recompute=True)
    rest = step.part_time(step.work.profile.rest, recompute=False)
    compute = c * recomputed + (n - c) * block_time + rest
    recompute = c * (recomputed - block_time)
    tp_comm = 0.0
    if plan.tp > 1:
        volume = 2 * (plan.tp - 1) / plan.tp * step.micro_batch * block.boundary_bytes
        tp_comm = 4 * n * _collective(volume, plan.tp, step.cluster.intra_node)
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
        link = cluster.inter_node if plan.tp * plan.pp > cluster.devices_per_node else cluster.intra_node
        p2p = 2 * virtual * _collective(step.micro_batch * step.block.boundary_bytes / plan.tp, 2, link)
    return bubble * (stage_micro + p2p), p2p


def _data_parallel_comm(step: _Step) -> float:
    """Gradient reduction and parameter gathering across replicas, what of it backward does not hide."""
    plan, cluster, block, m, n = step.plan, step.cluster, step.block, step.plan.microbatches, sum(step.fullest)
    dp, link, compute_bytes = plan.dp, _dp_link(plan, cluster), step.work.profile.param_bytes
    grad_bytes = step.stage_params * compute_bytes
    ring = 2 * (dp - 1) / dp if dp > 1 else 0.0
    # compute that communication can hide behind; on a CPU "device" gloo runs on the same cores: none
    overlap = 0.0 if step.cpu else 1.0
    backward = overlap * m * n * step.micro_batch * block.bwd_flops / plan.tp / step.attainable
    if plan.sharding in ("none", "optimizer"):
        exposed_after = _collective(ring * min(grad_bytes, DDP_BUCKET_BYTES), dp, link)
        comm = max(_collective(ring * grad_bytes, dp, link) - backward, 0.0) + exposed_after
        if plan.sharding == "optimizer":  # ZeRO-1: gradients all-reduced as above, updated pieces all-gathered
            comm += _collective(ring / 2 * step.stage_params * compute_bytes, dp, link)
    elif plan.sharding == "gradients":
        reduce_scatter = _collective(ring / 2 * grad_bytes, dp, link)
        all_gather = _collective(ring / 2 * step.stage_params * compute_bytes, dp, link)
        comm = max(reduce_scatter - backward, 0.0) + all_gather
    else:  # parameters / hybrid: per block all-gathers (forward, backward) and a reduce-scatter, prefetched
        group = shard_factors(plan, cluster)[0]
        shard_link = cluster.intra_node if plan.sharding == "hybrid" else link
        half_ring = (group - 1) / group
        gather = _collective(half_ring * block.params / plan.tp * compute_bytes, group, shard_link)
        per_block = 2 * gather + _collective(half_ring * block.params / plan.tp * compute_bytes, group, shard_link) / m
        comm = m * n * max(per_block - overlap * step.block_time(recompute=False), 0.0) + gather
        if plan.sharding == "hybrid" and dp > group:
            replicas = dp // group
            comm += _collective(2 * (replicas - 1) / replicas * grad_bytes / group, replicas, cluster.inter_node)
    # sharded gradients and parameters are copied into and out of flat communication buffers
    gathers = {"gradients": 1, "parameters": 2, "hybrid": 2}.get(plan.sharding, 0)
    if gathers:
        comm += m * (gathers + 1) * 2 * step.stage_params * compute_bytes / step.bandwidth
    return comm


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


def predict(plan: Plan, work: Workload, cluster: Cluster) -> Prediction:
    mem = memory(plan, work, cluster)
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
