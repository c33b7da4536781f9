"""What is trained and the figures of a plan both the memory and the time model use."""

from __future__ import annotations

from dataclasses import dataclass

from onegpu.plan import Plan
from onegpu.planner.frameworks import ONEGPU, Framework
from onegpu.planner.hardware import Cluster
from onegpu.planner.profile import ModelProfile

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
    framework: Framework = ONEGPU  # what the runtime overlaps (planner/frameworks.py)
    # (seconds, samples): one eager block's forward and backward as measured on the job's CPU device for that
    # many samples (planner/compile_measure.py); None: not measured, CPU time is costed from the datasheet alone
    measured_block: tuple[float, int] | None = None


def is_cpu(cluster: Cluster) -> bool:
    return cluster.device.name.startswith("cpu")


def micro_batch_size(plan: Plan, global_batch: int) -> float:
    return global_batch / (plan.dp * plan.microbatches)


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
