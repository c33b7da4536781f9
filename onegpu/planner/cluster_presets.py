"""Cluster presets: one node of 8 devices, figures from the vendors' public datasheets (cited inline)."""

from __future__ import annotations

from onegpu.planner.hardware import Cluster, DeviceSpec, Link

# ---------------------------------------------------------------------------------------------
# Presets: one node of 8 devices, figures from the vendors' public datasheets.
# NVIDIA datasheets quote Tensor Core TF32/BF16/FP16 "with sparsity": the dense figure is half.
# Latencies are not on datasheets: a few µs is typical for a small NCCL/RCCL message over
# NVLink/Infinity Fabric (3 µs) and over one RDMA hop of InfiniBand/Slingshot (5 µs).
# ---------------------------------------------------------------------------------------------

# NVIDIA A100 Tensor Core GPU datasheet (SXM4 column):
# https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
# FP32 19.5, TF32 156, BF16 312, FP16 312 TFLOPS dense; 40GB HBM2 at 1,555 GB/s, 80GB HBM2e at 2,039 GB/s;
# NVLink 3 600 GB/s (both directions together, so 300 GB/s per direction).
_A100_TFLOPS = {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}
_NVLINK3 = Link(bandwidth_gbps=300.0, latency_us=3.0)
# NVIDIA DGX A100 datasheet: 8x single-port ConnectX-6 200 Gb/s HDR InfiniBand, one per GPU = 25 GB/s.
# https://images.nvidia.com/aem-dam/Solutions/Data-Center/nvidia-dgx-a100-datasheet.pdf
_HDR_PER_GPU = Link(bandwidth_gbps=25.0, latency_us=5.0)

# NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column):
# https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
# FP32 67 TFLOPS; TF32 989, BF16 1,979, FP16 1,979 TFLOPS with sparsity (494.5 / 989.5 / 989.5 dense);
# 80GB HBM3 at 3.35 TB/s; NVLink 4 900 GB/s (450 GB/s per direction).
_HOPPER_TFLOPS = {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}
_NVLINK4 = Link(bandwidth_gbps=450.0, latency_us=3.0)
# NVIDIA DGX H100/H200 datasheets: 8x ConnectX-7 400 Gb/s NDR InfiniBand, one per GPU = 50 GB/s.
# https://resources.nvidia.com/en-us-dgx-systems/ai-enterprise-dgx
# https://resources.nvidia.com/en-us-dgx-systems/dgx-h200-datasheet
_NDR_PER_GPU = Link(bandwidth_gbps=50.0, latency_us=5.0)

# The H100 of Meta's Grand Teton hosts that torchtitan's benchmarks ran on (pytorch/torchtitan
# benchmarks/llama3_h100_202412_torchtitan.md @9dec370, "Hardware"): an SXM H100 with 96 GB HBM2e at
# 2.4 TB/s, at its default 500 W power limit (700 W is the H100 SXM TDP); 8 per host "fully connected with
# NVLink" (NVLink 4, as any SXM H100); "backend RDMA network with 400 Gb/s per GPU" = 50 GB/s.
# Its dense BF16 peak is on no datasheet: torchtitan's docs/performance.md @3faaa1a0d (footnote 1) says "the
# actual peak TFLOPs number is between SXM and NVL". Two estimates agree on 885 TFLOP/s: (1) linear in the
# power limit between the H100 NVL (datasheet: 1,671 sparse = 835.5 dense BF16 TFLOPS at 350-400 W; 400 W)
# and the H100 SXM (989.5 at 700 W): 835.5 + (989.5 - 835.5) * (500 - 400) / (700 - 400) = 886.8;
# (2) a power-capped clock: dynamic power ~ f * V^2 with V ~ f, so f ~ P^(1/3): 989.5 * (500/700)^(1/3) = 884.9.
_H100_500W_TFLOPS = {"fp32": 67.0 * 885 / 989.5, "tf32": 442.5, "bf16": 885.0, "fp16": 885.0}

# NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column): same Hopper compute as H100 SXM,
# 141GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
# https://nvdam.widen.net/s/nb5zzzsjdf/hpc-datasheet-sc23-h200-datasheet-3002446

# AMD Instinct MI250X, one device = one GCD (graphics compute die): PyTorch/ROCm sees an MI250X as two
# GPUs, so a node of 4 MI250X has 8 devices, each with half the package's figures.
# AMD Instinct MI250X data sheet / product page (per package: FP32 matrix 95.7, FP16 383, BF16 383 TFLOPS,
# no sparsity; 128 GB HBM2e at 3.2 TB/s):
# https://www.amd.com/content/dam/amd/en/documents/instinct-tech-docs/data-sheets/amd-instinct-mi250x-datasheet.pdf
# https://www.amd.com/en/products/accelerators/instinct/mi200/mi250x.html
# fp32 is the matrix-core figure (PyTorch's fp32 GEMMs run there; the vector figure is 47.9 per package).
# AMD ROCm docs, "AMD Instinct MI250 microarchitecture": 1.6 TB/s HBM per GCD; one Infinity Fabric link
# is 50 GB/s per direction. https://rocm.docs.amd.com/en/latest/conceptual/gpu-arch/mi250.html
# OLCF Frontier User Guide: the 2 GCDs of one MI250X share 200 GB/s, GCDs of different MI250X have
# 50-100 GB/s (1-2 links); we take the slowest, one link. 4x Slingshot 200 Gb/s (25 GB/s) NICs per
# node of 8 GCDs = 12.5 GB/s per GCD. https://docs.olcf.ornl.gov/systems/frontier_user_guide.html
_MI250X_GCD = DeviceSpec(
    name="MI250X (one GCD)",
    memory_gb=64.0,
    peak_tflops={"fp32": 47.85, "bf16": 191.5, "fp16": 191.5},
    memory_bandwidth_gbps=1600.0,
)

# AMD Instinct MI300X data sheet: FP32 163.4, TF32 653.7, BF16 1,307.4, FP16 1,307.4 TFLOPS dense;
# 192 GB HBM3 at 5.3 TB/s; 7 Infinity Fabric links to the other GPUs of an 8-GPU platform at 128 GB/s
# peak each (both directions), so 7 x 64 = 448 GB/s per direction to all peers together.
# https://www.amd.com/content/dam/amd/en/documents/instinct-tech-docs/data-sheets/amd-instinct-mi300x-data-sheet.pdf
# Inter-node: 8x 400 Gb/s NICs per 8-GPU node is the usual build, e.g. Microsoft Azure ND MI300X v5
# ("InfiniBand: 8x400 Gigabit NDR"): 50 GB/s per GPU.
# https://learn.microsoft.com/azure/virtual-machines/sizes/gpu-accelerated/nd-mi300x-v5-series
_MI300X = DeviceSpec(
    name="MI300X",
    memory_gb=192.0,
    peak_tflops={"fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4},
    memory_bandwidth_gbps=5300.0,
)


def _preset(name: str, device: DeviceSpec, intra: Link, inter: Link) -> Cluster:
    return Cluster(device=device, nodes=1, devices_per_node=8, intra_node=intra, inter_node=inter, name=name)


PRESETS: dict[str, Cluster] = {
    "a100-40gb": _preset(
        "a100-40gb",
        DeviceSpec(name="A100 SXM4 40GB", memory_gb=40.0, peak_tflops=_A100_TFLOPS, memory_bandwidth_gbps=1555.0),
        _NVLINK3,
        _HDR_PER_GPU,
    ),
    "a100-80gb": _preset(
        "a100-80gb",
        DeviceSpec(name="A100 SXM4 80GB", memory_gb=80.0, peak_tflops=_A100_TFLOPS, memory_bandwidth_gbps=2039.0),
        _NVLINK3,
        _HDR_PER_GPU,
    ),
    "h100-80gb": _preset(
        "h100-80gb",
        DeviceSpec(name="H100 SXM5 80GB", memory_gb=80.0, peak_tflops=_HOPPER_TFLOPS, memory_bandwidth_gbps=3350.0),
        _NVLINK4,
        _NDR_PER_GPU,
    ),
    "h100-96gb-500w": _preset(
        "h100-96gb-500w",
        DeviceSpec(
            name="H100 SXM 96GB HBM2e (500 W)",
            memory_gb=96.0,
            peak_tflops=_H100_500W_TFLOPS,
            memory_bandwidth_gbps=2400.0,
        ),
        _NVLINK4,
        _NDR_PER_GPU,
    ),
    "h200": _preset(
        "h200",
        DeviceSpec(name="H200 SXM 141GB", memory_gb=141.0, peak_tflops=_HOPPER_TFLOPS, memory_bandwidth_gbps=4800.0),
        _NVLINK4,
        _NDR_PER_GPU,
    ),
    "mi250x": _preset(
        "mi250x",
        _MI250X_GCD,
        Link(bandwidth_gbps=50.0, latency_us=3.0),
        Link(bandwidth_gbps=12.5, latency_us=5.0),
    ),
    "mi300x": _preset(
        "mi300x",
        _MI300X,
        Link(bandwidth_gbps=448.0, latency_us=3.0),
        Link(bandwidth_gbps=50.0, latency_us=5.0),
    ),
}
