"""Where a pool's devices come from, and what holds a job's devices besides its lease rows.

Two backends, chosen by ``backend`` in ``pool.toml``:

- ``local``: this machine's accelerators, or CPU slots; the lease rows are the whole hold.
- ``ray``: the devices of a Ray cluster's alive nodes (``pool/ray_pool.py``); a job's devices are
  also reserved in Ray, as one placement group pinned to their nodes.

The ledger (``pool/ledger.py``) is the same for both: it chooses a job's devices, keeps the line of
waiting jobs, and records usage. How workers start on the devices is the launcher's part:
torchrun on one machine (``launch/run.py``), an actor per device on Ray (``launch/ray_run.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

from onegpu.pool.config import Device, PoolConfig, this_machine


class PoolBackend(Protocol):
    def devices(self, pool: PoolConfig) -> tuple[Device, ...]:
        """The devices the pool has now, with ids stable while it runs."""
        ...

    def hold(self, pool: PoolConfig, *, job: str, devices: tuple[int, ...]) -> contextlib.AbstractContextManager[Any]:
        """Hold ``devices`` (ids the ledger leased to ``job``) for the job's workers while the block runs."""
        ...


class LocalBackend:
    """The devices of this machine."""

    def devices(self, pool: PoolConfig) -> tuple[Device, ...]:
        return this_machine(pool)

    @contextlib.contextmanager
    def hold(self, pool: PoolConfig, *, job: str, devices: tuple[int, ...]) -> Iterator[None]:
        yield  # one machine: the lease rows are the whole hold


def pool_backend(pool: PoolConfig) -> PoolBackend:
    """The backend ``pool.toml`` names."""
    if pool.backend == "ray":
        from onegpu.pool.ray_pool import RayBackend

        return RayBackend()
    return LocalBackend()
