"""Flavors: how many of the pool's devices stand behind the one virtual device.

Named as single-virtual-device platforms name them: Small = 1 device, Medium = 2, Large = 4,
xLarge = 8, 1.5xLarge = 12, 2xLarge = 16, 3xLarge = 24, ..., suffixed with the total memory
(``Large.256GB``). The current flavor is the user's, kept in ``$ONEGPU_HOME/flavors/<user>``.
"""

from __future__ import annotations

import getpass
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from onegpu.errors import UsageError
from onegpu.pool.config import PoolConfig, onegpu_home, writable_home

SMALL_NAMES = {1: "Small", 2: "Medium", 4: "Large"}


@dataclass(frozen=True)
class Flavor:
    name: str  # e.g. "Large.256GB"
    devices: int
    memory_gb: float

    @property
    def family(self) -> str:
        return self.name.split(".")[0]


def standard_name(devices: int) -> str:
    """Small, Medium, Large for 1, 2, 4 devices; then multiples of 8 devices as ``{n/8}xLarge``."""
    if devices in SMALL_NAMES:
        return SMALL_NAMES[devices]
    times = devices / 8
    return "xLarge" if times == 1 else f"{times:g}xLarge"


def standard_sizes(limit: int) -> list[int]:
    """1, 2, 4, then 8 x (1, 1.5, 2, 3, 4, 6, 8, 12, ...): up to ``limit`` devices."""
    sizes, times = [1, 2, 4], 1.0
    while 8 * times <= limit:
        sizes.append(int(8 * times))
        times = times * 1.5 if math.log2(times).is_integer() else times * 4 / 3
    return [s for s in sizes if s <= limit]


def _named(pool: PoolConfig, *, limit: int) -> tuple[tuple[str, int], ...]:
    """(name, device count) of the pool's flavors up to ``limit`` devices: its own, or the standard ones."""
    return pool.flavors or tuple((standard_name(n), n) for n in standard_sizes(limit))


def _called(flavor_name: str, name: str) -> bool:
    """Whether ``name`` names the flavor ``flavor_name``: whole (``Large.24GB``) or its family (``large``)."""
    return name.lower() in (flavor_name.lower(), flavor_name.split(".")[0].lower())


def all_flavors(pool: PoolConfig) -> list[Flavor]:
    """The flavors this pool can serve, smallest first."""
    count = len(pool.devices)
    memory = pool.devices[0].memory_gb if pool.devices else 0.0
    return [Flavor(f"{name}.{memory * n:g}GB", n, memory * n) for name, n in _named(pool, limit=count) if n <= count]


def find_flavor(pool: PoolConfig, name: str) -> Flavor:
    """The flavor called ``name`` (``Large`` or ``Large.256GB``, any case); an unknown one lists the valid ones."""
    flavors = all_flavors(pool)
    for flavor in flavors:
        if _called(flavor.name, name):
            return flavor
    choices = f"choose one of {', '.join(f.name for f in flavors)}"
    for family, devices in _named(pool, limit=1 << 16):
        if _called(family, name.split(".")[0]):  # a flavor, but larger than this pool
            raise UsageError(f"{family} needs {devices} devices and this pool has {len(pool.devices)}: {choices}")
    raise UsageError(f"no flavor {name!r} on this pool: {choices}")


def _flavor_file(home: Path | None) -> Path:
    """The user's choice: one file per user, so that users sharing a home (and its ledger) keep their own."""
    return (home or onegpu_home()) / "flavors" / getpass.getuser()


def default_flavor(pool: PoolConfig) -> Flavor:
    """Medium on CPU slots (2 workers), every accelerator otherwise: the largest flavor within that."""
    wanted = 2 if pool.devices and pool.devices[0].kind == "cpu" else len(pool.devices)
    flavors = all_flavors(pool)
    return max((f for f in flavors if f.devices <= wanted), key=lambda f: f.devices, default=flavors[0])


def current_flavor(pool: PoolConfig, home: Path | None = None) -> Flavor:
    """The user's chosen flavor, or the default one when none was chosen or the pool shrank below it."""
    path = _flavor_file(home)
    if path.exists():
        chosen = path.read_text().strip()
        for flavor in all_flavors(pool):
            if _called(flavor.name, chosen):
                return flavor
    return default_flavor(pool)


def switch_flavor(pool: PoolConfig, name: str, home: Path | None = None) -> Flavor:
    """Make ``name`` the user's flavor (kept across sessions); returns it."""
    flavor = find_flavor(pool, name)
    path = _flavor_file(writable_home(home))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as staging:  # never half-written
        staging.write(flavor.family + "\n")
    Path(staging.name).replace(path)
    return flavor
