"""``local``: this machine (or the running job's devices) measured as a one-node cluster."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import socket
import time
from pathlib import Path
from typing import Any

import platformdirs

from onegpu.errors import UsageError
from onegpu.machine import cpu_cores, memory_bytes
from onegpu.planner.cluster_yaml import cluster_from_dict
from onegpu.planner.hardware import Cluster, DeviceSpec, Link, check_positive
from onegpu.settings import settings

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
    check_positive(workers, "workers", integer=True)
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


def cache_root() -> Path:
    """Where measurements are kept: ``$ONEGPU_HOME/cache``, else the user cache directory."""
    home = settings().home
    return home / "cache" if home else Path(platformdirs.user_cache_dir("onegpu"))


def _cache_path(workers: int | str) -> Path:
    key = _cache_key(workers)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", f"local-cluster-{workers}w-torch{key['torch']}-{key['host']}")
    return cache_root() / f"{stem}.json"


def _read_cache(path: Path, workers: int | str) -> Cluster | None:
    """The cached cluster, or None when there is none or it is unreadable (it is then measured again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["key"] != _cache_key(workers):
            return None
        return cluster_from_dict(data["cluster"], name="local")
    except (OSError, ValueError, KeyError, TypeError, UsageError):
        return None


def _write_cache(path: Path, workers: int | str, cluster: Cluster) -> None:
    write_json(path, {"key": _cache_key(workers), "cluster": cluster.to_dict()})


def write_json(path: Path, data: dict) -> None:
    """Best effort: a read-only cache directory only costs a new measurement next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass


def _measure(workers: int) -> Cluster:
    """Spawn the worker processes, collect their figures, and describe the machine with them."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    cores = cpu_cores()
    threads = max(1, cores // workers)
    nprocs = max(2, workers)  # a link needs two ends, even for a one-worker cluster
    memory = memory_bytes()
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
    nodes: int = 1,
    inter_node: tuple[float, float] | None = None,
) -> Cluster:
    """``nodes`` nodes of ``devices`` measured devices each; the link inside a node also serves across nodes
    unless ``inter_node`` (bytes/s, seconds of latency) was measured."""
    link = Link(bandwidth_gbps=_sig(link_bytes_per_s / 1e9), latency_us=_sig(latency_s * 1e6))
    if inter_node is not None:
        across = Link(bandwidth_gbps=_sig(inter_node[0] / 1e9), latency_us=_sig(inter_node[1] * 1e6))
    device = DeviceSpec(
        name=name,
        memory_gb=_sig(device_memory_bytes / 1e9),
        peak_tflops={precision: _sig(flops / 1e12) for precision, flops in flops_per_s.items()},
        memory_bandwidth_gbps=_sig(memory_bytes_per_s / 1e9),
    )
    return Cluster(
        device=device,
        nodes=nodes,
        devices_per_node=devices,
        intra_node=link,
        inter_node=link if inter_node is None else across,
        name="local",
    )


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


def _ping_pong_latency(rank: int, rounds: int = 100, *, device=None, peers: tuple[int, int] = (0, 1)) -> float:
    """One-way time of a 4-byte message between ranks 0 and 1: half a fast round trip.

    The 10th percentile, not the median: on a busy machine a round trip often waits a scheduler
    time slice (milliseconds) for a core, which is other programs' load, not the link's latency.
    """
    import torch
    import torch.distributed as dist

    message = torch.zeros(1, device=device or torch.device("cpu"))
    accelerator = message.device.type != "cpu"
    times = []
    if rank in peers:
        peer = peers[1] if rank == peers[0] else peers[0]
        for i in range(10 + rounds):  # the first 10 warm the connection up
            start = time.perf_counter()
            if rank == peers[0]:
                dist.send(message, peer)
                dist.recv(message, peer)
            else:
                dist.recv(message, peer)
                dist.send(message, peer)
            if accelerator:  # NCCL's send and recv return once queued: wait for the message itself
                torch.accelerator.synchronize(message.device)
            if i >= 10:
                times.append(time.perf_counter() - start)
    dist.barrier()
    return sorted(times)[len(times) // 10] / 2 if times else math.inf


def _all_reduce_bus_bandwidth(
    nprocs: int, nbytes: int = 32 * 2**20, repeats: int = 3, *, device=None, group=None
) -> float:
    """Per-device, per-direction bytes/s of a large all-reduce over ``group`` of ``nprocs`` (the ring's 2(n-1)/n
    bus bandwidth)."""
    import torch
    import torch.distributed as dist

    tensor = torch.ones(nbytes // 4, device=device or torch.device("cpu"))
    dist.all_reduce(tensor, group=group)  # warm-up
    best = math.inf
    for _ in range(repeats):
        dist.barrier(group=group)
        best = min(best, _seconds(lambda: dist.all_reduce(tensor, group=group), device))
    return 2 * (nprocs - 1) / nprocs * tensor.nbytes / best


def measure_job_cluster(
    *, rank: int, world_size: int, device=None, devices_per_node: int | None = None, cache: bool = True
) -> Cluster:
    """This machine as the running job sees it, measured with the job's own workers and process group.

    Collective: every worker calls it (inside ``prepare``). ``device`` is the worker's device: a
    CPU (each worker's share of the cores and memory) or an accelerator (its matmul FLOP/s in fp32
    and bf16, its memory and bandwidth, and the links of the job's backend, e.g. NCCL). Same cache
    as ``measure_local_cluster``, without spawning processes. A one-worker job has no link to
    measure; its link figures are placeholders that no one-worker plan uses. A job over several nodes
    (``devices_per_node`` workers each) measures the link inside a node within each node, and the one
    across nodes over all workers.
    """
    import torch
    import torch.distributed as dist

    device = device or torch.device("cpu")
    distributed = dist.is_available() and dist.is_initialized() and world_size > 1
    per_node = devices_per_node if devices_per_node and world_size % devices_per_node == 0 else world_size
    key: int | str = world_size if device.type == "cpu" else f"{world_size}-{device.type}"
    if per_node < world_size:
        key = f"{key}-{world_size // per_node}nodes"
    path = _cache_path(key)
    cached = _read_cache(path, key) if cache and rank == 0 else None
    shared: list[Any] = [None if cached is None else cached.to_dict()]  # plain data: it is pickled
    if distributed:
        dist.broadcast_object_list(shared, src=0)
    if shared[0] is None:
        cluster = _measure_job(
            rank=rank, world_size=world_size, per_node=per_node, device=device, distributed=distributed
        )
        shared = [None if cluster is None else cluster.to_dict()]
        if cluster is not None:
            _write_cache(path, key, cluster)
        if distributed:
            dist.broadcast_object_list(shared, src=0)
    return cluster_from_dict(shared[0], name="local")


def _measure_job(*, rank: int, world_size: int, per_node: int, device, distributed: bool) -> Cluster | None:
    """Every worker measures its device; the slowest counts. Rank 0 returns the cluster (others None)."""
    import torch
    import torch.distributed as dist

    accelerator = device.type != "cpu"
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
        memory = memory_bytes() // per_node
        copy_bytes = min(128 * 2**20, memory_bytes() // (8 * per_node))
    copy = _copy_bytes_per_s(copy_bytes, device=device)
    slowest = torch.tensor([flops, bf16, copy], dtype=torch.float64, device=device)
    latency, link, inter = 50e-6, 1e9, None  # placeholders for one worker: no plan of one worker communicates
    if distributed:
        dist.all_reduce(slowest, op=dist.ReduceOp.MIN)  # synchronous training runs at the slowest worker
        latency, link = _links(rank, size=per_node, device=device)
        if per_node < world_size:  # across nodes: node 0's first worker and node 1's
            across = _ping_pong_latency(rank, device=device, peers=(0, per_node))
            inter = (_all_reduce_bus_bandwidth(world_size, device=device), across)
            latency, link = (across, inter[0]) if per_node == 1 else (latency, link)  # no link inside a node
    if rank != 0:  # rank 0 measured every latency
        return None
    peaks = {"fp32": slowest[0].item(), **({"bf16": slowest[1].item()} if accelerator else {})}
    return _measured_node(
        name=f"{device.type} (measured)" if accelerator else _cpu_name(torch.get_num_threads()),
        devices=per_node,
        device_memory_bytes=memory,
        flops_per_s=peaks,
        memory_bytes_per_s=slowest[2].item(),
        link_bytes_per_s=link,
        latency_s=latency,
        nodes=world_size // per_node,
        inter_node=inter,
    )


def _links(rank: int, *, size: int, device) -> tuple[float, float]:
    """Latency and all-reduce bandwidth inside a node of ``size`` workers, measured in every node at once."""
    import torch.distributed as dist

    if size == 1:
        return 50e-6, 1e9  # placeholders: a node of one device has no link inside it
    group = dist.new_subgroups(group_size=size)[0] if size < dist.get_world_size() else None
    return _ping_pong_latency(rank, device=device), _all_reduce_bus_bandwidth(size, device=device, group=group)
