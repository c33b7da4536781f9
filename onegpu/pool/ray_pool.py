"""A pool of the devices of a Ray cluster's nodes (``backend = "ray"`` in ``pool.toml``).

Each alive node offers its ``device_resource`` (``GPU`` by default; a custom resource such as
``onegpu_device`` on CPU nodes) as device slots. The ledger stays the source of truth for who holds
which device and for billing: it gives each node device ids of its own the first time it sees it, and
chooses a job's devices. Ray then reserves them, all at once, as one placement group whose bundles are
pinned to the chosen devices' nodes; the job's workers run inside it (``onegpu.launch.ray_workers``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

from onegpu.errors import UsageError
from onegpu.pool.config import Device, PoolConfig, onegpu_home

RESERVE_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 5.0
NODE_LABEL = "ray.io/node-id"


def ray_module() -> Any:
    """Ray, imported (it is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise UsageError('backend = "ray" in pool.toml needs Ray: pip install "onegpu[ray]"') from None
    return ray


def connect(pool: PoolConfig) -> Any:
    """This process connected to the pool's Ray cluster (once); returns the ``ray`` module."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # workers run in this Python environment as it is
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        _probe(pool.address)
        ray.init(
            address=pool.address,
            namespace="onegpu",
            log_to_driver=False,  # the workers' lines reach the job's terminal through onegpu, without prefixes
            logging_level=logging.ERROR,
            configure_logging=True,
            include_dashboard=False,
        )
    except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
        where = pool.address if pool.address != "auto" else "this machine (address unset: RAY_ADDRESS or pool.toml)"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(
            f"cannot reach the Ray cluster at {where} ({first}): start it with `ray start --head`, or fix address "
            f"in {pool.path}"
        ) from None
    if threading.current_thread() is threading.main_thread():  # Ray's core logs a SIGTERM and ends the process:
        for signum, handler in handlers.items():  # the job's own handlers stop its workers and say why
            if handler is not None:
                signal.signal(signum, handler)
    return ray


def _probe(address: str) -> None:
    """Fail in seconds on an address where no Ray cluster listens (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not port.isdigit():
        return
    with socket.create_connection((host or "127.0.0.1", int(port)), timeout=PROBE_TIMEOUT_S):
        pass


def alive_nodes(pool: PoolConfig) -> list[dict]:
    """The cluster's alive nodes that offer the pool's device resource, in a stable order."""
    ray = connect(pool)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(pool.device_resource, 0) >= 1]
    return sorted(nodes, key=lambda n: n["NodeID"])


class RayBackend:
    """The devices of a Ray cluster's alive nodes; a job's are held as one placement group."""

    def devices(self, pool: PoolConfig) -> tuple[Device, ...]:
        return ray_devices(pool)

    @contextlib.contextmanager
    def hold(self, pool: PoolConfig, *, job: str, devices: tuple[int, ...]) -> Iterator[Any]:
        group = reserve(pool, job=job, devices=devices)
        try:
            yield group
        finally:
            release(group)


def ray_devices(pool: PoolConfig) -> tuple[Device, ...]:
    """The devices of the Ray cluster's alive nodes, numbered by the ledger."""
    from onegpu.pool.ledger import open_ledger

    nodes = alive_nodes(pool)
    if not nodes:
        custom = "onegpu_device" if pool.device_resource == "GPU" else pool.device_resource
        raise UsageError(
            f"the Ray cluster at {pool.address} has no node offering {pool.device_resource!r}: start Ray on nodes "
            f"with it, or on CPU nodes with ray start --resources='{{\"{custom}\": 2}}' and device_resource = "
            f'"{custom}" in {pool.path}'
        )
    ledger = open_ledger(url=pool.database_url, home=onegpu_home(), ttl_s=pool.lease_ttl_s)
    slots = {n["NodeID"]: int(n["Resources"][pool.device_resource]) for n in nodes}
    first = ledger.register_nodes([(n["NodeID"], n["NodeManagerAddress"], slots[n["NodeID"]]) for n in nodes])
    gpu = pool.device_resource == "GPU"
    devices = []
    for node in nodes:
        node_id, count = node["NodeID"], slots[node["NodeID"]]
        memory = pool.slot_memory_gb or round(node["Resources"].get("memory", 0) / count / 1e9, 1)
        name = "GPU" if gpu else f"{pool.device_resource} slot"
        devices += [
            Device(
                index=first[node_id] + i,
                name=name,
                memory_gb=memory,
                kind="cuda" if gpu else "cpu",
                node=node_id,
                host=node["NodeManagerAddress"],
            )
            for i in range(count)
        ]
    return tuple(devices)


def reserve(pool: PoolConfig, *, job: str, devices: tuple[int, ...]) -> Any:
    """One placement group holding ``devices`` (ids of ``pool``), bundle i on device i's node; removed and a
    one-line UsageError when Ray cannot reserve them (held outside onegpu) within a minute."""
    ray = connect(pool)
    from ray.util.placement_group import placement_group, remove_placement_group

    node_of = pool.node_of()
    group = placement_group(
        [{pool.device_resource: 1} for _ in devices],
        strategy="PACK",
        name=f"onegpu-{job}",
        bundle_label_selector=[{NODE_LABEL: node_of[d]} for d in devices],
    )
    ready, _ = ray.wait([group.ready()], timeout=RESERVE_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        raise UsageError(
            f"Ray could not reserve the devices the ledger gave job {job} within {RESERVE_TIMEOUT_S:.0f} s: something "
            f"outside onegpu holds {pool.device_resource!r} on their nodes; stop it, or run again"
        )
    return group


def release(group: Any) -> None:
    """Give the placement group's devices back to Ray (nothing when Ray is gone)."""
    ray = ray_module()
    from ray.util.placement_group import remove_placement_group

    if ray.is_initialized():
        try:
            remove_placement_group(group)
        except Exception:  # noqa: BLE001 - a cluster shutting down removes it anyway
            pass


def lost_nodes(pool: PoolConfig, *, nodes: set[str]) -> set[str]:
    """Which of ``nodes`` (Ray node ids) are gone: declared dead by Ray, or with a raylet that no longer accepts
    connections (Ray declares a node dead only after its health checks fail, up to half a minute later)."""
    ray = connect(pool)
    known = {n["NodeID"]: n for n in ray.nodes()}
    return {node for node in nodes if node not in known or not known[node].get("Alive") or not _answers(known[node])}


def _answers(node: dict) -> bool:
    try:
        with socket.create_connection((node["NodeManagerAddress"], int(node["NodeManagerPort"])), timeout=2.0):
            return True
    except OSError:
        return False
