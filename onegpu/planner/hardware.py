"""What the planner plans for: one kind of device, how many, and the links between them.

Units, everywhere: memory in GB and bandwidth in GB/s with 1 GB = 10**9 bytes (datasheet units),
compute in dense TFLOP/s (no structured-sparsity factor), latency in microseconds. A link's figures
are per device and per direction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from onegpu.errors import UsageError

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One accelerator: memory (GB), dense peak TFLOP/s per precision, memory bandwidth (GB/s)."""

    name: str
    memory_gb: float
    peak_tflops: Mapping[str, float] = field(hash=False)
    memory_bandwidth_gbps: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise UsageError(f"DeviceSpec.name must be a non-empty string, got {self.name!r}")
        check_positive(self.memory_gb, "DeviceSpec.memory_gb")
        check_peaks(self.peak_tflops, "DeviceSpec.peak_tflops")
        check_positive(self.memory_bandwidth_gbps, "DeviceSpec.memory_bandwidth_gbps")
        # read-only copy: a preset's figures cannot be changed through one of its users
        object.__setattr__(self, "peak_tflops", MappingProxyType(dict(self.peak_tflops)))

    def peak_flops(self, precision: str) -> float:
        """Dense peak FLOP/s at ``precision``.

        fp32 never falls back to tf32: TF32 rounds the inputs of a matmul, and PyTorch only uses it
        when asked to (``torch.set_float32_matmul_precision``), so an fp32 plan must use the fp32 peak.
        """
        if precision not in PRECISIONS:
            raise UsageError(f"precision {precision!r} is not known: use one of {', '.join(PRECISIONS)}")
        if precision not in self.peak_tflops:
            raise UsageError(
                f"{self.name} has no {precision} peak (it has {', '.join(self.peak_tflops)}): "
                f"add peak_tflops.{precision} to the cluster's device or plan in another precision"
            )
        return self.peak_tflops[precision] * 1e12

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "memory_gb": self.memory_gb,
            "peak_tflops": dict(self.peak_tflops),
            "memory_bandwidth_gbps": self.memory_bandwidth_gbps,
        }


@dataclass(frozen=True, kw_only=True)
class Link:
    """What one device gets from a network, in one direction: GB/s and a per-message latency (µs)."""

    bandwidth_gbps: float
    latency_us: float

    def __post_init__(self) -> None:
        check_positive(self.bandwidth_gbps, "Link.bandwidth_gbps")
        check_positive(self.latency_us, "Link.latency_us")

    def to_dict(self) -> dict:
        return {"bandwidth_gbps": self.bandwidth_gbps, "latency_us": self.latency_us}


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """``nodes`` machines of ``devices_per_node`` identical devices; NVLink-like links inside a node."""

    device: DeviceSpec
    nodes: int
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.device, DeviceSpec):
            raise UsageError(f"Cluster.device must be a DeviceSpec, got {type(self.device).__name__}")
        check_positive(self.nodes, "Cluster.nodes", integer=True)
        check_positive(self.devices_per_node, "Cluster.devices_per_node", integer=True)
        for name in ("intra_node", "inter_node"):
            if not isinstance(getattr(self, name), Link):
                raise UsageError(f"Cluster.{name} must be a Link, got {type(getattr(self, name)).__name__}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def memory_bytes(self) -> int:
        """One device's memory in bytes, counting 1 GB as 10**9 bytes.

        Datasheets write GB; HBM is sized in GiB (an "80GB" A100 or H100 has about 80 GiB), so this is
        about 7% under the physical size. We keep the decimal figure: it is what the datasheet says,
        and the difference is headroom for the CUDA/ROCm context and allocator fragmentation.
        """
        return round(self.device.memory_gb * 1e9)

    def to_dict(self) -> dict:
        """The cluster YAML file's fields (``name`` is not one of them: a file is named by its path)."""
        return {
            "device": self.device.to_dict(),
            "nodes": self.nodes,
            "devices_per_node": self.devices_per_node,
            "intra_node": self.intra_node.to_dict(),
            "inter_node": self.inter_node.to_dict(),
        }

    def with_overrides(self, *, nodes: int | None = None, devices_per_node: int | None = None) -> Cluster:
        """This cluster with another node count or node size; ``None`` keeps the current value."""
        return replace(
            self,
            nodes=self.nodes if nodes is None else nodes,
            devices_per_node=self.devices_per_node if devices_per_node is None else devices_per_node,
        )


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(value: Any, what: str, *, integer: bool = False) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else is_number(value)
    if not ok or value <= 0:
        raise UsageError(f"{what} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def check_peaks(peaks: Any, what: str) -> None:
    if not isinstance(peaks, Mapping) or not peaks:
        raise UsageError(f"{what} must map precisions ({', '.join(PRECISIONS)}) to dense TFLOP/s, got {peaks!r}")
    for precision, tflops in peaks.items():
        if precision not in PRECISIONS:
            raise UsageError(f"{what} has unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
        check_positive(tflops, f"{what}.{precision}")
