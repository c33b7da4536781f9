"""Peak memory of one device under a Plan: the project's one memory estimate (the search and the simple rule
both ask it).

Conservative: every byte a worker holds at its peak (states, the framework's own buffers, activations of
all micro-batches in flight, the recomputation peak), plus a fixed runtime overhead.
"""

from __future__ import annotations

from onegpu.plan import INTERLEAVED, Plan
from onegpu.planner.hardware import Cluster
from onegpu.planner.profile import ModelProfile
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


def vocabulary_padding(prof: ModelProfile, *, tp: int) -> float:
    """Parameters a tensor-parallel worker holds beyond its share: a vocabulary ``tp`` does not divide is
    padded to a multiple of it, so the embedding and the head (counted untied) each hold up to one more row."""
    if tp == 1 or not prof.vocab_size or not prof.hidden_size:
        return 0.0
    return 2 * (-(-prof.vocab_size // tp) - prof.vocab_size / tp) * prof.hidden_size


def memory(plan: Plan, work: Workload, cluster: Cluster | None = None, *, cpu: bool = False) -> dict[str, int]:
    """Peak bytes per device, by kind, on ``cluster``'s devices (none: the simple rule's, CPUs when ``cpu``, else
    accelerators). A profile of parameters alone (``ModelProfile.of_parameters``) has no ``activations``."""
    prof, tp = work.profile, plan.tp
    cpu = is_cpu(cluster) if cluster is not None else cpu
    workers = worker_stage_blocks(prof, pp=plan.pp, schedule=plan.schedule)
    n = max(sum(stages) for stages in workers)
    block = prof.typical_block
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
    if cpu:
        pass  # a CPU device's host memory is its own memory: offloading frees nothing
    elif plan.offload == "optimizer":
        optimizer = workspace = 0.0
    elif plan.offload == "parameters":
        params = grads = optimizer = workspace = 0.0
    if plan.pp == 1 and plan.microbatches > 1 and sg > 1:  # accumulated whole on the device, reduced once per call
        grads = stage_params * MASTER_BYTES
    fragmentation = CPU_FRAGMENTATION if cpu else FRAGMENTATION
    out = {
        "parameters": int(params),
        "gradients": int(grads),
        "optimizer": int(optimizer),
        "optimizer_workspace": int(workspace),
        "framework_buffers": int(framework * fragmentation),
    }
    if prof.activations_measured:
        out["activations"] = int(_activations(plan, work, workers) * fragmentation)
    return {**out, "runtime": int(CPU_RUNTIME_BYTES + CPU_COMPILE_BYTES * plan.compile if cpu else GPU_RUNTIME_BYTES)}


def _activations(plan: Plan, work: Workload, workers: list[tuple[int, ...]]) -> float:
    """Activation bytes at the fullest worker's peak: what its micro-batches in flight keep (a checkpointed block its
    input, a selective one also its matmul outputs), one block's backward working set and its recomputation."""
    block, head = work.profile.typical_block, work.profile.rest.activation_bytes  # the logits are gathered whole
    share = tp_activation_share(plan.tp, sequence_parallel=work.sequence_parallel)
    block_activation = block.activation_bytes * share
    kept = (plan.selective and block.selective_activation_bytes or block.activation_bytes) * share

    per_micro: dict[tuple[int, ...], float] = {}  # workers of equal stages hold equal activations

    def held(worker: int) -> float:
        """One micro-batch's activations on ``worker`` (the last one computes the head), times those in flight."""
        sizes = workers[worker]
        if sizes not in per_micro:
            checkpointed = [plan.checkpointed_blocks(size) for size in sizes]
            per_micro[sizes] = sum(c * block.boundary_bytes + (size - c) * kept
                                   for size, c in zip(sizes, checkpointed))  # fmt: skip
        return in_flight(plan, worker=worker) * (per_micro[sizes] + (head if worker == plan.pp - 1 else 0.0))

    recompute_peak = block_activation if plan.checkpointed_blocks(max(map(sum, workers))) else block_activation - kept
    b = micro_batch_size(plan, work.global_batch)
    return b * (max(held(w) for w in range(plan.pp)) + recompute_peak + block_activation)
