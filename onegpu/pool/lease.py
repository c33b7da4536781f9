"""A job's hold on devices of the pool: leased at start, renewed while it runs, released when it ends."""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from onegpu.errors import UsageError
from onegpu.pool.config import PoolConfig, load_pool, onegpu_home
from onegpu.pool.flavors import all_flavors
from onegpu.pool.ledger import Ledger, open_ledger


@dataclass(frozen=True)
class JobLease:
    job: str
    devices: tuple[int, ...]
    pool: PoolConfig


def pool_ledger(pool: PoolConfig) -> Ledger:
    return open_ledger(url=pool.database_url, home=onegpu_home(), ttl_s=pool.lease_ttl_s)


@contextmanager
def leased_devices(
    *, count: int, wait: bool = True, on_lost: Callable[[str], None] | None = None, job: str | None = None
) -> Iterator[JobLease]:
    """Hold ``count`` devices of this machine's pool for the duration of the block, for ``job`` (default: a
    new name, ``<user>-<8 hex digits>``).

    Waits in line (saying for what) when they are taken, or fails at once when ``wait`` is False.
    The leases are renewed by a thread and released however the block ends; if the whole process
    is killed, they expire after the pool's ``lease_ttl_s``. When renewals keep failing for half
    that time, ``on_lost(reason)`` is called once, from the thread, to stop what uses the devices
    before they are given to another job. A job named again (a restarted job under another launcher) first
    ends the leases its processes on this host left when they died. ``onegpu cancel`` stops the job the same way (seen at the next renewal,
    every ``lease_ttl_s / 6``).
    """
    pool = load_pool()
    if count > len(pool.devices):
        largest = all_flavors(pool)[-1]
        raise UsageError(
            f"{count} devices: this pool has {len(pool.devices)}; the largest flavor is {largest.name} "
            f"({largest.devices} device{'s' if largest.devices > 1 else ''})"
        )
    ledger = pool_ledger(pool)
    job = job or f"{getpass.getuser()}-{uuid.uuid4().hex[:8]}"
    _end_leases_of_dead_processes(ledger, job=job)
    try:
        devices = ledger.acquire(
            job=job,
            devices=count,
            pool_devices=pool.node_of(),
            wait=wait,
            on_wait=lambda message: print(f"onegpu: {message}", file=sys.stderr, flush=True),
        )
    except BaseException:  # Ctrl-C while waiting: leave the line (a place a failing ledger keeps expires)
        with contextlib.suppress(UsageError):
            ledger.release(job=job)
        raise
    stop = threading.Event()

    def renew() -> None:
        renewed, cancelled = time.monotonic(), False
        while not stop.wait(pool.lease_ttl_s / 6):
            try:
                ledger.renew(job=job)
                renewed = time.monotonic()
                if not cancelled and (by := ledger.cancelled_by(job=job)):  # onegpu cancel, from any machine
                    cancelled = True  # stopped once; the leases stay renewed until released
                    reason = f"job {job} was cancelled by {by} with onegpu cancel"
                    (on_lost or _say)(reason)
            except Exception as exc:  # noqa: BLE001 - a busy or broken ledger: try again at the next beat
                failing = time.monotonic() - renewed
                if on_lost is not None and failing > pool.lease_ttl_s / 2:
                    if not stop.is_set():
                        on_lost(
                            f"the job was stopped because its device leases could not be renewed for {failing:.0f} s: {exc}"
                        )
                    return
                print(f"onegpu: could not renew the device leases: {exc}", file=sys.stderr, flush=True)

    thread = threading.Thread(target=renew, name="onegpu-lease", daemon=True)
    since = time.monotonic()
    thread.start()
    try:
        yield JobLease(job=job, devices=devices, pool=pool)
    finally:
        stop.set()
        thread.join()
        _release(ledger, job=job, devices=devices, held_s=time.monotonic() - since)


def _end_leases_of_dead_processes(ledger: Ledger, *, job: str) -> None:
    """End ``job``'s leases taken on this host by a process that is gone (killed before releasing them)."""
    for holding in ledger.holdings():
        if holding.job == job and holding.host == socket.gethostname() and not _alive(holding.pid):
            ledger.release(job=job, devices=holding.devices)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _say(message: str) -> None:
    print(f"onegpu: {message}", file=sys.stderr, flush=True)


def _release(ledger: Ledger, *, job: str, devices: tuple[int, ...], held_s: float) -> None:
    """End the job's leases; a ledger that fails now costs a warning, never the job's own outcome."""
    try:
        ledger.release(job=job)
    except UsageError as exc:
        held = f"devices {','.join(map(str, devices))} for {held_s:.0f} s"
        print(f"onegpu: warning: the usage of job {job} ({held}) was not recorded: {exc}", file=sys.stderr, flush=True)


def resize_lease(lease: JobLease, *, count: int) -> JobLease:
    """The job's lease grown or shrunk to ``count`` devices: the devices it keeps stay leased (one interval
    each), the extra ones are released, the missing ones acquired (waiting in line, saying for what)."""
    pool = load_pool() if lease.pool.backend == "ray" else lease.pool  # a Ray pool's nodes come and go
    lease = JobLease(job=lease.job, devices=lease.devices, pool=pool)
    ledger = pool_ledger(pool)
    if count <= len(lease.devices):
        ledger.release(job=lease.job, devices=lease.devices[count:])
        return JobLease(job=lease.job, devices=lease.devices[:count], pool=lease.pool)
    added = ledger.acquire(
        job=lease.job,
        devices=count - len(lease.devices),
        pool_devices=lease.pool.node_of(),
        on_wait=lambda message: print(f"onegpu: {message}", file=sys.stderr, flush=True),
    )
    return JobLease(job=lease.job, devices=(*lease.devices, *added), pool=lease.pool)
