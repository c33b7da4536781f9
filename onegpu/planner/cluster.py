"""The cluster the planner plans for: one kind of device, how many, and the links between them.

Units, everywhere: memory in GB and bandwidth in GB/s with 1 GB = 10**9 bytes (datasheet units),
compute in dense TFLOP/s (no structured-sparsity factor), latency in microseconds. A link's figures
are per device and per direction.

A cluster comes from a preset (``PRESETS``, vendor datasheet figures), from a YAML file with
exactly the fields of ``Cluster.to_dict()``, or, for ``local``, from measuring this machine.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import platformdirs
import yaml

from onegpu.errors import UsageError

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
DEVICE_FIELDS = ("name", "memory_gb", "peak_tflops", "memory_bandwidth_gbps")
LINK_FIELDS = ("bandwidth_gbps", "latency_us")
CLUSTER_FIELDS = ("device", "nodes", "devices_per_node", "intra_node", "inter_node")


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
        _check_positive(self.memory_gb, "DeviceSpec.memory_gb")
        _check_peaks(self.peak_tflops, "DeviceSpec.peak_tflops")
        _check_positive(self.memory_bandwidth_gbps, "DeviceSpec.memory_bandwidth_gbps")
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
        _check_positive(self.bandwidth_gbps, "Link.bandwidth_gbps")
        _check_positive(self.latency_us, "Link.latency_us")

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
        _check_positive(self.nodes, "Cluster.nodes", integer=True)
        _check_positive(self.devices_per_node, "Cluster.devices_per_node", integer=True)
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive(value: Any, what: str, *, integer: bool = False) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else _is_number(value)
    if not ok or value <= 0:
        raise UsageError(f"{what} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def _check_peaks(peaks: Any, what: str) -> None:
    if not isinstance(peaks, Mapping) or not peaks:
        raise UsageError(f"{what} must map precisions ({', '.join(PRECISIONS)}) to dense TFLOP/s, got {peaks!r}")
    for precision, tflops in peaks.items():
        if precision not in PRECISIONS:
            raise UsageError(f"{what} has unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
        _check_positive(tflops, f"{what}.{precision}")


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


# ---------------------------------------------------------------------------------------------
# Loading: a preset, ``local``, or a YAML file
# ---------------------------------------------------------------------------------------------


def load_cluster(spec: str, *, nodes: int | None = None, devices_per_node: int | None = None) -> Cluster:
    """A preset (any case), ``local`` (this machine, measured once and cached) or a cluster YAML file.

    ``nodes``/``devices_per_node`` override the spec's. For ``local``, ``devices_per_node`` is the
    number of worker processes to measure (default 2).
    """
    key = spec.strip().lower()
    if key == "local":
        return measure_local_cluster(workers=devices_per_node or 2).with_overrides(nodes=nodes)
    if key in PRESETS:
        return PRESETS[key].with_overrides(nodes=nodes, devices_per_node=devices_per_node)
    path = Path(spec).expanduser()
    if not path.is_file():
        names = ", ".join([*PRESETS, "local"])
        if path.suffix in (".yaml", ".yml") or os.sep in spec or path.exists():
            raise UsageError(
                f"cluster file {spec} does not exist or is not a file: check the path, or use a preset ({names})"
            )
        raise UsageError(
            f"{spec!r} is not a cluster preset ({names}): use one of them or the path to a cluster YAML file"
        )
    try:
        cluster = _cluster_from_dict(_read_yaml(path), name=path.stem)
    except UsageError as error:
        raise UsageError(f"{path}: {error}") from None
    return cluster.with_overrides(nodes=nodes, devices_per_node=devices_per_node)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read the file ({error}): check its permissions and that it is UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "somewhere"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"invalid YAML at {where} ({problem}): fix the syntax there") from None


def _cluster_from_dict(data: Any, *, name: str = "") -> Cluster:
    """A Cluster from the YAML file's fields; errors name the field and what it must be."""
    data = _exact_fields(data, CLUSTER_FIELDS, "cluster")
    for key in ("nodes", "devices_per_node"):
        _check_positive(data[key], key, integer=True)
    return Cluster(
        device=_device_from_dict(data["device"]),
        nodes=data["nodes"],
        devices_per_node=data["devices_per_node"],
        intra_node=_link_from_dict(data["intra_node"], "intra_node"),
        inter_node=_link_from_dict(data["inter_node"], "inter_node"),
        name=name,
    )


def _device_from_dict(data: Any) -> DeviceSpec:
    data = _exact_fields(data, DEVICE_FIELDS, "device")
    if not isinstance(data["name"], str) or not data["name"]:
        raise UsageError(f"device.name must be a non-empty string, got {data['name']!r}")
    _check_positive(data["memory_gb"], "device.memory_gb")
    _check_peaks(data["peak_tflops"], "device.peak_tflops")
    _check_positive(data["memory_bandwidth_gbps"], "device.memory_bandwidth_gbps")
    return DeviceSpec(**data)


def _link_from_dict(data: Any, where: str) -> Link:
    data = _exact_fields(data, LINK_FIELDS, where)
    for key in LINK_FIELDS:
        _check_positive(data[key], f"{where}.{key}")
    return Link(**data)


def _exact_fields(data: Any, expected: tuple[str, ...], where: str) -> dict:
    fields = ", ".join(expected)
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a mapping with fields {fields}, got {data!r}")
    for key in data:
        if key not in expected:
            raise UsageError(f"unknown field {key!r} in {where}: expected fields {fields}")
    for key in expected:
        if key not in data:
            raise UsageError(f"missing field {key!r} in {where}: expected fields {fields}")
    return data


# ---------------------------------------------------------------------------------------------
# ``local``: this machine measured as a one-node cluster of CPU worker processes
# ---------------------------------------------------------------------------------------------

_RESULT_KEY = "onegpu/local-cluster"
_MEASURE_DEADLINE_S = 120.0


def measure_local_cluster(*, workers: int = 2, cache: bool = True) -> Cluster:
    """This machine as one node of ``workers`` CPU devices, measured with real worker processes.

    Each device gets ``cores // workers`` threads and ``1/workers`` of the machine's memory. Its fp32
    peak is the best of a few square matmuls and its memory bandwidth the best large tensor copy,
    run in all workers at once, as training would. The link is measured between the processes over
    gloo on 127.0.0.1: latency is half a fast small send/recv round trip, bandwidth the bus
    bandwidth of a large all-reduce. ``inter_node`` is ``intra_node``. The result is cached per
    worker count, torch version and host (in ``$ONEGPU_HOME/cache``, else the user cache
    directory); ``cache=False`` measures again.
    """
    _check_positive(workers, "workers", integer=True)
    path = _cache_path(workers)
    if cache:
        cached = _read_cache(path, workers)
        if cached is not None:
            return cached
    cluster = _measure(workers)
    _write_cache(path, workers, cluster)
    return cluster


def _cache_key(workers: int | str) -> dict:
    import torch

    return {"workers": workers, "torch": torch.__version__, "host": platform.node()}


def _cache_path(workers: int | str) -> Path:
    home = os.environ.get("ONEGPU_HOME")
    root = Path(home).expanduser() / "cache" if home else Path(platformdirs.user_cache_dir("onegpu"))
    key = _cache_key(workers)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", f"local-cluster-{workers}w-torch{key['torch']}-{key['host']}")
    return root / f"{stem}.json"


def _read_cache(path: Path, workers: int | str) -> Cluster | None:
    """The cached cluster, or None when there is none or it is unreadable (it is then measured again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["key"] != _cache_key(workers):
            return None
        return _cluster_from_dict(data["cluster"], name="local")
    except (OSError, ValueError, KeyError, TypeError, UsageError):
        return None


def _write_cache(path: Path, workers: int | str, cluster: Cluster) -> None:
    """Best effort: a read-only cache directory only costs a new measurement next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": _cache_key(workers), "cluster": cluster.to_dict()}, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _machine_memory_bytes() -> int:
    """Physical memory, or the container's memory limit when that is lower (cgroup v2 or v1)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def _measure(workers: int) -> Cluster:
    """Spawn the worker processes, collect their figures, and describe the machine with them."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    cores = _cpu_count()
    threads = max(1, cores // workers)
    nprocs = max(2, workers)  # a link needs two ends, even for a one-worker cluster
    memory = _machine_memory_bytes()
    copy_bytes = min(128 * 2**20, memory // (8 * nprocs))
    timeout = datetime.timedelta(seconds=_MEASURE_DEADLINE_S)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)
    context = mp.start_processes(
        _measure_worker,
        args=(store.port, nprocs, workers, threads, copy_bytes),
        nprocs=nprocs,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + _MEASURE_DEADLINE_S
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise UsageError(
                    f"measuring this machine took over {_MEASURE_DEADLINE_S:.0f} s: "
                    "use a preset or a cluster YAML file instead of 'local'"
                )
        figures = json.loads(store.get(_RESULT_KEY))
    except (mp.ProcessRaisedException, mp.ProcessExitedException, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        raise UsageError(
            f"measuring this machine failed ({first_line}): use a preset or a cluster YAML file instead of 'local'"
        ) from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return _measured_node(
        name=_cpu_name(threads),
        devices=workers,
        device_memory_bytes=memory / workers,
        flops_per_s={"fp32": figures["flops"]},
        memory_bytes_per_s=figures["memory_bytes_per_s"],
        link_bytes_per_s=figures["link_bytes_per_s"],
        latency_s=figures["latency_s"],
    )


def _cpu_name(threads: int) -> str:
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})"


def _measured_node(
    *,
    name: str,
    devices: int,
    device_memory_bytes: float,
    flops_per_s: dict[str, float],
    memory_bytes_per_s: float,
    link_bytes_per_s: float,
    latency_s: float,
) -> Cluster:
    """One node of ``devices`` measured devices; its one link serves inside and across nodes."""
    link = Link(bandwidth_gbps=_sig(link_bytes_per_s / 1e9), latency_us=_sig(latency_s * 1e6))
    device = DeviceSpec(
        name=name,
        memory_gb=_sig(device_memory_bytes / 1e9),
        peak_tflops={precision: _sig(flops / 1e12) for precision, flops in flops_per_s.items()},
        memory_bandwidth_gbps=_sig(memory_bytes_per_s / 1e9),
    )
    return Cluster(device=device, nodes=1, devices_per_node=devices, intra_node=link, inter_node=link, name="local")


def _sig(value: float) -> float:
    """Four significant digits: the measurement is not more precise than that."""
    return float(f"{value:.4g}")


def _measure_worker(rank: int, port: int, nprocs: int, workers: int, threads: int, copy_bytes: int) -> None:
    """One worker process: compute and memory figures (ranks < workers), then the link between all."""
    import torch
    import torch.distributed as dist

    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    if loopback and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback  # this process only: keep gloo on 127.0.0.1
    torch.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=_MEASURE_DEADLINE_S)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=nprocs, timeout=timeout)
    try:
        computes = rank < workers
        dist.barrier()
        flops = _matmul_flops() if computes else math.inf
        dist.barrier()
        copy = _copy_bytes_per_s(copy_bytes) if computes else math.inf
        slowest = torch.tensor([flops, copy], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MIN)  # synchronous training runs at the slowest worker
        latency = _ping_pong_latency(rank)
        link = _all_reduce_bus_bandwidth(nprocs)
        if rank == 0:
            figures = {
                "flops": slowest[0].item(),
                "memory_bytes_per_s": slowest[1].item(),
                "latency_s": latency,
                "link_bytes_per_s": link,
            }
            store.set(_RESULT_KEY, json.dumps(figures))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _seconds(fn, device=None) -> float:
    """Wall time of ``fn``; on an accelerator, until its queued kernels have finished."""
    import torch

    sync = (lambda: torch.accelerator.synchronize(device)) if device is not None and device.type != "cpu" else None
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def _matmul_flops(target_s: float = 0.2, repeats: int = 3, *, device=None, dtype=None) -> float:
    """Best FLOP/s (fp32 unless ``dtype``) of square matmuls sized to take about ``target_s`` each."""
    import torch

    options = {"device": device or torch.device("cpu"), "dtype": dtype or torch.float32}
    n = 512
    a, b = torch.randn(n, n, **options), torch.randn(n, n, **options)
    a @ b  # warm-up: thread pool, kernels
    took = _seconds(lambda: a @ b, device)
    limit = 4096 if options["device"].type == "cpu" else 16384
    n = int(min(limit, max(256, n * (target_s / took) ** (1 / 3)))) // 64 * 64
    a, b = torch.randn(n, n, **options), torch.randn(n, n, **options)
    out = torch.empty(n, n, **options)
    best = min(_seconds(lambda: torch.mm(a, b, out=out), device) for _ in range(repeats))
    return 2 * n**3 / best


def _copy_bytes_per_s(nbytes: int, repeats: int = 3, *, device=None) -> float:
    """Best memory bandwidth of a large tensor copy, counting the bytes read and the bytes written."""
    import torch

    src = torch.ones(nbytes // 4, device=device or torch.device("cpu"))
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: fault the pages in
    best = min(_seconds(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * src.nbytes / best


def _ping_pong_latency(rank: int, rounds: int = 100, *, device=None) -> float:
    """One-way time of a 4-byte message between ranks 0 and 1: half a fast round trip.

    The 10th percentile, not the median: on a busy machine a round trip often waits a scheduler
    time slice (milliseconds) for a core, which is other programs' load, not the link's latency.
    """
    import torch
    import torch.distributed as dist

    message = torch.zeros(1, device=device or torch.device("cpu"))
    times = []
    if rank in (0, 1):
        peer = 1 - rank
        for i in range(10 + rounds):  # the first 10 warm the connection up
            start = time.perf_counter()
            if rank == 0:
                dist.send(message, peer)
                dist.recv(message, peer)
            else:
                dist.recv(message, peer)
                dist.send(message, peer)
            if i >= 10:
                times.append(time.perf_counter() - start)
    dist.barrier()
    return sorted(times)[len(times) // 10] / 2 if times else math.inf


def _all_reduce_bus_bandwidth(nprocs: int, nbytes: int = 32 * 2**20, repeats: int = 3, *, device=None) -> float:
    """Per-device, per-direction bytes/s of a large all-reduce (the ring's 2(n-1)/n bus bandwidth)."""
    import torch
    import torch.distributed as dist

    tensor = torch.ones(nbytes // 4, device=device or torch.device("cpu"))
    dist.all_reduce(tensor)  # warm-up
    best = math.inf
    for _ in range(repeats):
        dist.barrier()
        best = min(best, _seconds(lambda: dist.all_reduce(tensor), device))
    return 2 * (nprocs - 1) / nprocs * tensor.nbytes / best


def measure_job_cluster(*, rank: int, world_size: int, device=None, cache: bool = True) -> Cluster:
    """This machine as the running job sees it, measured with the job's own workers and process group.

    Collective: every worker calls it (inside ``prepare``). ``device`` is the worker's device: a
    CPU (each worker's share of the cores and memory) or an accelerator (its matmul FLOP/s in fp32
    and bf16, its memory and bandwidth, and the links of the job's backend, e.g. NCCL). Same cache
    as ``measure_local_cluster``, without spawning processes. A one-worker job has no link to
    measure; its link figures are placeholders that no one-worker plan uses.
    """
    import torch
    import torch.distributed as dist

    device = device or torch.device("cpu")
    accelerator = device.type != "cpu"
    distributed = dist.is_available() and dist.is_initialized() and world_size > 1
    key = world_size if not accelerator else f"{world_size}-{device.type}"
    path = _cache_path(key)
    cached = _read_cache(path, key) if cache and rank == 0 else None
    shared: list[Any] = [None if cached is None else cached.to_dict()]  # plain data: it is pickled
    if distributed:
        dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        return _cluster_from_dict(shared[0], name="local")
    if distributed:
        dist.barrier()
    flops = _matmul_flops(device=device)
    bf16 = _matmul_flops(device=device, dtype=torch.bfloat16) if accelerator else 0.0
    if distributed:
        dist.barrier()
    if accelerator:
        free, total = torch.accelerator.get_memory_info(device.index)
        memory, copy_bytes = total, min(1 << 30, free // 8)
    else:
        memory = _machine_memory_bytes() // world_size
        copy_bytes = min(128 * 2**20, _machine_memory_bytes() // (8 * world_size))
    copy = _copy_bytes_per_s(copy_bytes, device=device)
    slowest = torch.tensor([flops, bf16, copy], dtype=torch.float64, device=device)
    latency, link = 50e-6, 1e9  # placeholders for one worker: no plan of one worker communicates
    if distributed:
        dist.all_reduce(slowest, op=dist.ReduceOp.MIN)  # synchronous training runs at the slowest worker
        latency = _ping_pong_latency(rank, device=device)
        link = _all_reduce_bus_bandwidth(world_size, device=device)
    shared = [None]
    if rank == 0:  # only ranks 0 and 1 measured the latency
        peaks = {"fp32": slowest[0].item()}
        if accelerator:
            peaks["bf16"] = slowest[1].item()
        cluster = _measured_node(
            name=f"{device.type} (measured)" if accelerator else _cpu_name(torch.get_num_threads()),
            devices=world_size,
            device_memory_bytes=memory,
            flops_per_s=peaks,
            memory_bytes_per_s=slowest[2].item(),
            link_bytes_per_s=link,
            latency_s=latency,
        )
        _write_cache(path, key, cluster)
        shared = [cluster.to_dict()]
    if distributed:
        dist.broadcast_object_list(shared, src=0)
    return _cluster_from_dict(shared[0], name="local")
