"""A job on a Ray pool, attempt after attempt: its devices reserved as one placement group, one worker per
device on its node, and, when a worker fails or a node is lost, every worker started again (up to
``--max-restarts`` times; the script resumes with ``onegpu.load_state``).

A lost node's leases end at once, billed up to the loss. The job then goes on at its size when the pool
can give it other devices now, else on the devices it has left, and waits in line for devices when none
are left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.api import SignalException

from onegpu.errors import LaunchError, UsageError
from onegpu.launch.failures import Failure, root_cause
from onegpu.launch.ray_workers import WorkerEnd, WorkerSpec, forwarded_environment, worker_host_actor
from onegpu.launch.status import attempt_directory
from onegpu.pool import ray_pool
from onegpu.pool.backend import pool_backend
from onegpu.pool.config import load_pool
from onegpu.pool.lease import JobLease, pool_ledger
from onegpu.settings import worker_environment

POLL_S = 0.2
LOST_NODE_WAIT_S = 120.0  # how long stopped workers' hosts may take to answer (Ray declares a node dead first)


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended: its failures (None: every worker ended well) and the nodes it lost."""

    failures: list[Failure] | None
    lost: dict[str, tuple[int, ...]]  # node -> the job's devices on it
    first_failure_s: float | None = None  # epoch seconds


def run_on_ray(
    script: str, args: list[str], *, lease: JobLease, status: Path, max_restarts: int, log_dir: Path | None = None
) -> JobLease:
    """Run the job's workers until they end well; returns the lease as it is then (smaller after a lost
    node). Raises LaunchError with the cause once every restart is used."""
    restart, wanted = 0, len(lease.devices)
    with _signals_surfaced():
        while True:
            with pool_backend(lease.pool).hold(lease.pool, job=lease.job, devices=lease.devices) as group:
                outcome = _attempt(script, args, lease=lease, group=group, status=status, restart=restart,
                                   limit=max_restarts, log_dir=log_dir)  # fmt: skip
            if outcome.lost:
                lease = _drop_lost(lease, outcome)
            if outcome.failures is None:
                return lease
            cause = _cause(outcome, lease=lease, status=attempt_directory(status, restart))
            if restart >= max_restarts:
                raise LaunchError(
                    f"{cause} (after {max_restarts} restart{'s' * (max_restarts > 1)})" if max_restarts else cause
                )
            restart += 1
            print(f"onegpu: {cause}", file=sys.stderr, flush=True)
            if len(lease.devices) < wanted:
                lease = _replace_lost(lease, wanted=wanted, lost=set(outcome.lost))


def _cause(outcome: Outcome, *, lease: JobLease, status: Path) -> str:
    if outcome.lost:
        nodes = ", ".join(
            f"{node[:12]} ({len(devices)} device{'s' * (len(devices) > 1)})" for node, devices in outcome.lost.items()
        )
        return f"node {nodes} of the Ray pool was lost: its leases ended"
    return root_cause(outcome.failures or [], status=status)


def _drop_lost(lease: JobLease, outcome: Outcome) -> JobLease:
    """The lost devices' leases ended, at the first failure the loss caused (billing stops there)."""
    lost = tuple(d for devices in outcome.lost.values() for d in devices)
    pool_ledger(lease.pool).release(job=lease.job, devices=lost, at=outcome.first_failure_s)
    return replace(lease, devices=tuple(d for d in lease.devices if d not in lost))


def _replace_lost(lease: JobLease, *, wanted: int, lost: set[str]) -> JobLease:
    """Devices for the job's lost ones if the pool has them free now; else the job goes on with the devices
    it has, or waits in line for devices when it has none."""
    pool = load_pool()
    ledger = pool_ledger(pool)
    missing = wanted - len(lease.devices)
    # a node Ray has not declared dead yet is still in the pool: not one the job just lost
    node_of = {device: node for device, node in pool.node_of().items() if node not in lost}
    try:
        added = ledger.acquire(job=lease.job, devices=missing, pool_devices=node_of, wait=not lease.devices)
    except UsageError:
        print(f"onegpu: going on with {len(lease.devices)} of {wanted} devices", file=sys.stderr, flush=True)
        return replace(lease, pool=pool)
    return replace(lease, devices=(*lease.devices, *added), pool=pool)


def _ranked(lease: JobLease) -> list[int]:
    """The lease's devices in rank order: node by node, in the order the nodes first appear."""
    node_of = lease.pool.node_of()
    order = list(dict.fromkeys(node_of[d] for d in lease.devices))
    return sorted(lease.devices, key=lambda d: (order.index(node_of[d]), lease.devices.index(d)))


def _attempt(
    script: str, args: list[str], *, lease: JobLease, group: Any, status: Path, restart: int, limit: int, log_dir=None
) -> Outcome:
    ray = ray_pool.connect(lease.pool)
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    node_of, ranked = lease.pool.node_of(), _ranked(lease)
    request = {"num_gpus": 1} if lease.pool.device_resource == "GPU" else {"resources": {lease.pool.device_resource: 1}}
    host_class = worker_host_actor()
    hosts = [
        host_class.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=lease.devices.index(d)
            ),
            **request,
        ).remote()
        for d in ranked
    ]
    try:
        address, port = ray.get(hosts[0].address.remote())
        specs = _specs(
            script,
            args,
            lease=lease,
            ranked=ranked,
            address=address,
            port=port,
            status=status,
            restart=restart,
            limit=limit,
            log_dir=log_dir,
        )
        refused = [reason for reason in ray.get([h.start.remote(s) for h, s in zip(hosts, specs)]) if reason]
        if refused:
            raise LaunchError(refused[0])
        ends, dead, first = _watch(ray, hosts)
    finally:
        for host in hosts:
            ray.kill(host)
    attempt = attempt_directory(status, restart)
    for end in ends.values():  # a node without the job's directory sent its workers' status files along
        attempt.mkdir(parents=True, exist_ok=True)
        for name, text in end.status.items():
            if not (attempt / name).exists():
                (attempt / name).write_text(text)
    failed = {node_of[ranked[r]] for r in dead} | {node_of[ranked[e.rank]] for e in ends.values() if e.code != 0}
    gone = ray_pool.lost_nodes(lease.pool, nodes=failed)
    lost = {node: tuple(d for d in lease.devices if node_of[d] == node) for node in sorted(gone)}
    failures = [_failure(end) for end in ends.values() if end.code != 0]
    failures += [
        Failure(rank=r, exitcode=-signal.SIGKILL, message=None, time_us=first * 1e6, usage=False) for r in dead
    ]
    return Outcome(failures=failures or None, lost=lost, first_failure_s=first if lost else None)


def _specs(script, args, *, lease, ranked, address, port, status, restart, limit, log_dir=None) -> list[WorkerSpec]:
    node_of = lease.pool.node_of()
    forwarded = forwarded_environment()
    forwarded.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # as onegpu run's local workers (launch/run.py)
    specs = []
    for rank, device in enumerate(ranked):
        local = [d for d in ranked if node_of[d] == node_of[device]]
        env = {
            **forwarded,
            **worker_environment(
                job=lease.job, devices=tuple(local), launcher_pid=os.getpid(), status_dir=status, log_dir=log_dir
            ),  # fmt: skip
            "RANK": str(rank),
            "WORLD_SIZE": str(len(ranked)),
            "LOCAL_RANK": str(local.index(device)),
            "LOCAL_WORLD_SIZE": str(len(local)),
            "GROUP_RANK": str(list(dict.fromkeys(node_of[d] for d in ranked)).index(node_of[device])),
            "MASTER_ADDR": address,
            "MASTER_PORT": str(port),
            "TORCHELASTIC_RESTART_COUNT": str(restart),
            "TORCHELASTIC_MAX_RESTARTS": str(limit),
        }
        spec = WorkerSpec(rank=rank, local_rank=local.index(device), device=device, node=node_of[device],
                          script=os.path.abspath(script), args=tuple(args), env=env, cwd=os.getcwd(), status_dir=str(status))  # fmt: skip
        specs.append(spec)
    return specs


def _watch(ray: Any, hosts: list[Any]) -> tuple[dict[int, WorkerEnd], set[int], float | None]:
    """Forward the workers' lines until every worker ended; once one fails, stop the others. Returns how each
    ended, the ranks whose host died (its node, or its process), and when the first failure happened."""
    from ray.exceptions import RayError

    waits = {host.wait.remote(rank): rank for rank, host in enumerate(hosts)}
    lines = {host.output.remote(): rank for rank, host in enumerate(hosts)}
    ends: dict[int, WorkerEnd] = {}
    dead: set[int] = set()
    first: float | None = None
    stopped_at: float | None = None
    while waits:
        done, _ = ray.wait(list(waits), num_returns=len(waits), timeout=POLL_S)
        _forward(ray, hosts, lines, dead)
        for ref in done:
            rank = waits.pop(ref)
            try:
                ends[rank] = ray.get(ref)
            except RayError:
                dead.add(rank)
            if (rank in dead or ends[rank].code != 0) and first is None:
                first = time.time()
        if first is not None and stopped_at is None:
            stopped_at = time.monotonic()
            for rank, host in enumerate(hosts):
                if rank not in dead and rank not in ends:
                    host.stop.remote()
        if stopped_at is not None and time.monotonic() - stopped_at > LOST_NODE_WAIT_S:
            dead |= set(waits.values())  # hosts that never answered: their nodes are gone
            break
    _forward(ray, hosts, lines, dead, last=True)  # the calls made while the workers still ran
    _forward(ray, hosts, {hosts[r].output.remote(): r for r in range(len(hosts)) if r not in dead}, dead, last=True)
    return ends, dead, first


def _forward(ray: Any, hosts: list[Any], lines: dict, dead: set[int], *, last: bool = False) -> None:
    """Print what the workers printed since the last call (their stdout on ours, their stderr on ours); ``last``:
    wait a moment for the answers, and ask no more."""
    from ray.exceptions import RayError

    ready, _ = ray.wait(list(lines), num_returns=len(lines), timeout=1.0 if last else 0)
    for ref in ready:
        rank = lines.pop(ref)
        try:
            out, err = ray.get(ref)
        except RayError:
            continue
        sys.stdout.write(out)
        sys.stderr.write(err)
        if not last and rank not in dead:
            lines[hosts[rank].output.remote()] = rank
    sys.stdout.flush()
    sys.stderr.flush()


def _failure(end: WorkerEnd) -> Failure:
    info = (end.error or {}).get("message")
    extra = info.get("extraInfo", {}) if isinstance(info, dict) else {}
    return Failure(
        rank=end.rank,
        exitcode=end.code,
        message=info["message"] if isinstance(info, dict) else None,
        time_us=extra.get("onegpu_time_us", end.time_us),
        usage=bool(extra.get("onegpu_usage")),
    )


@contextlib.contextmanager
def _signals_surfaced() -> Iterator[None]:
    """Ctrl-C ends the job as under torchelastic (which converts it the same way): a SignalException, the workers
    stopped on the way out; SIGTERM is converted by ``launch``. Ray's calls wrap an exception a signal handler
    raised inside them in a SystemError: it is unwrapped here."""

    def raise_(signum: int, _frame: Any) -> None:
        raise SignalException(f"received {signal.Signals(signum).name}", sigval=signal.Signals(signum))

    previous = signal.signal(signal.SIGINT, raise_)
    try:
        yield
    except SystemError as error:
        if isinstance(error.__cause__, SignalException):
            raise error.__cause__ from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
