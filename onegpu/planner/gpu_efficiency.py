"""What GPUs and their libraries reach of a datasheet's figures: GEMMs and attention kernels of a given kind, NCCL's
bus bandwidth and latency, and what communication hidden under compute still costs. Each figure cites its source."""

from __future__ import annotations

import math

from onegpu.planner.hardware import Link

# Fraction of dense peak that GEMMs of transformer shapes reach in training (cuBLAS/rocBLAS reach
# 70-80% on large square bf16 matrices, less on the thinner projections of real layers).
GEMM_EFFICIENCY = 0.70
# Flash attention reaches less: FlashAttention-2 reports 50-73% of A100 peak forward, less backward
# (Dao 2023); on Hopper it reaches "only 35%" of H100 peak (Shah et al. 2024, FlashAttention-3, sec. 1),
# whose warp-specialised asynchronous kernels (FA3, cuDNN's fused attention) reach 75% forward, less backward.
ATTENTION_EFFICIENCY = 0.50
HOPPER_ATTENTION_EFFICIENCY = {False: 0.35, True: 0.60}  # by whether the kernel is Hopper-specific (FA3, cuDNN)
# Attention without a fused flash kernel materialises the (heads x seq x seq) scores: per element and pass, the
# score GEMM's output written (2 bytes), read and written by softmax (4), dropout's mask and output (3) and the
# context GEMM's read (2): 11 bytes in forward, as many in backward (Korthikanti et al. 2022, table 2: 5 bytes
# per score element kept; Dao et al. 2022, FlashAttention, sec. 2: these are memory-bound).
SCORE_BYTES_PER_PASS = 11
# Elementwise work run op by op (eager PyTorch, no fused kernels) moves more than the activations a block keeps:
# each op reads and writes whole tensors, norms and rotary embeddings in fp32. Counted op by op for a Llama block
# (RMSNorm 36, RoPE 25, K/V repeat and layout copies 21, residual adds 12, RMSNorm 36, SwiGLU 35 bytes per token
# and hidden unit in forward, about twice as much in backward): ~500 bytes, 2.4x the ~208 (4 passes over the
# ~52 bytes it keeps) of fused kernels. torchtitan's own figures bound it: torch.compile, which fuses them, makes
# Llama 3.1 8B 16% faster on 8 H100 (benchmarks/llama3_h100_202412_torchtitan.md, table 1).
UNFUSED_ELEMENTWISE_TRAFFIC = 2.4
# The bus bandwidth NCCL reaches for large messages, as a share of a datasheet link's bandwidth: 200-230 GB/s
# all-reduce bus bandwidth over NVLink 3's 300 GB/s on 8 A100 (nccl-tests issues #149, #178, NVIDIA/nccl #583),
# 85-96 GB/s over 4x HDR's 100 GB/s per node of A100 (nccl-tests issue #119).
NVLINK_BUS_EFFICIENCY = 0.70
NETWORK_BUS_EFFICIENCY = 0.90
# A collective hidden under compute still takes SMs from it: NCCL runs one CUDA block per channel ("using more
# channels increases the number of CUDA blocks NCCL uses", NCCL docs, NCCL_MAX_NCHANNELS), and a node with one NIC
# per GPU is served by about 2 channels per NIC: 16 of A100's 108 SMs (15%), of H100's 132 (12%). We take 15%
# of the hidden time as added to compute (Pati et al. 2024, T3, sec. 2.3: overlapped GEMMs and collectives slow
# each other by contending for SMs and memory bandwidth).
OVERLAP_SM_SHARE = 0.15


def attention_efficiency(device_name: str, *, hopper_kernel: bool) -> float:
    """Of dense peak, what flash attention reaches on this device (Hopper: with a Hopper-specific kernel or not)."""
    if device_name.startswith(("H100", "H200")):
        return HOPPER_ATTENTION_EFFICIENCY[hopper_kernel]
    return ATTENTION_EFFICIENCY


def collective_time(
    volume_bytes: float, group: int, link: Link, *, ring: bool = False, efficiency: float = 1.0
) -> float:
    """A collective moving ``volume_bytes`` per device at ``efficiency`` of the link's bandwidth. Its latency:
    an all-gather or reduce-scatter is a ring of ``group - 1`` hops; NCCL all-reduces with trees at scale,
    2 log2(group) hops (NCCL 2.4 release notes, "double binary trees"; Sanders et al. 2009)."""
    if group <= 1:
        return 0.0
    hops = group - 1 if ring else 2 * math.log2(group)
    return volume_bytes / (link.bandwidth_gbps * 1e9 * efficiency) + hops * link.latency_us * 1e-6


def overlapped(comm: float, compute: float) -> float:
    """What ``comm`` adds to a step when it runs under ``compute``: the part compute does not hide, and the
    SMs the hidden part takes from compute."""
    hidden = min(comm, compute)
    return comm - hidden + OVERLAP_SM_SHARE * hidden
