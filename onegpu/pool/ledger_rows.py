"""What the ledger's rows say: who holds which devices, who waits, who cancelled, the usage intervals and how
they are billed, the workers' latest figures; and how a job's devices are chosen among the free ones."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Holding:
    job: str
    user: str
    devices: tuple[int, ...]
    since: float
    host: str
    pid: int


@dataclass(frozen=True)
class Waiting:
    """A job in line for devices; ``position`` 1 is served first."""

    job: str
    user: str
    devices: int
    since: float
    position: int


@dataclass(frozen=True)
class Cancellation:
    """What ``Ledger.cancel`` found: the job's state (running, waiting, ended, unknown), user, earlier canceller."""

    state: str
    user: str | None
    earlier_by: str | None


@dataclass(frozen=True)
class Interval:
    job: str
    user: str
    device: int
    start: float
    end: float

    @property
    def billed_minutes(self) -> int:
        """Minutes billed: every started minute the device was held."""
        return max(1, math.ceil((self.end - self.start) / 60)) if self.end > self.start else 0

    def billed_minutes_between(self, start: float, end: float) -> int:
        """The billed minutes that begin in ``[start, end)``; adjacent ranges never share one."""
        return max(0, self._minutes_begun_before(end) - self._minutes_begun_before(start))

    def _minutes_begun_before(self, moment: float) -> int:
        if moment <= self.start:
            return 0
        if moment >= self.end:
            return self.billed_minutes
        return min(self.billed_minutes, math.ceil((moment - self.start) / 60))  # minute k begins at start + 60 k


@dataclass(frozen=True)
class Stat:
    device: int
    job: str
    memory_bytes: float
    utilization: float
    reported: float


def fewest_nodes(free: Sequence[int], *, node_of: Mapping[int, str], count: int) -> tuple[int, ...]:
    """``count`` of the ``free`` devices on as few nodes as possible: the node that fits them most tightly, else
    the nodes with most free devices first (a job's workers then talk across as few links as they can)."""
    by_node: dict[str, list[int]] = {}
    for device in free:
        by_node.setdefault(node_of[device], []).append(device)
    fitting = [devices for devices in by_node.values() if len(devices) >= count]
    if fitting:
        return tuple(min(fitting, key=len)[:count])
    chosen = [d for devices in sorted(by_node.values(), key=len, reverse=True) for d in devices]
    return tuple(chosen[:count])
