"""The device pool of this machine, from ``$ONEGPU_HOME/pool.toml`` (every key optional).

```toml
cpu_slots = 4                 # on a machine without accelerators: device slots to offer
slot_memory_gb = 6            # each CPU slot's memory budget
price_per_device_hour = 2.0   # for `onegpu usage`
lease_ttl_s = 30              # a job that stops renewing its leases loses them after this long
database_url = "postgresql://..."  # default: SQLite in $ONEGPU_HOME/ledger.sqlite (or ONEGPU_DATABASE_URL)
backend = "ray"               # default "local": this machine's devices; "ray": the devices of a Ray cluster's nodes
address = "10.0.0.1:6379"     # the Ray cluster (default: RAY_ADDRESS, else "auto": the cluster this machine joined)
device_resource = "GPU"       # the Ray resource one device is (default "GPU"; CPU pools: a custom one, e.g.
                              # `ray start --resources='{"onegpu_device": 2}'` with device_resource = "onegpu_device")
admins = ["alice"]            # OS users who may `onegpu cancel` anyone's job (others: only their own)

[flavors]                     # replaces the standard flavors: name = device count
Small = 1
Big = 3
```

Flavors larger than this machine's pool are skipped (one file may serve machines of several sizes),
but at least one must fit. A negative price is refused; 0 (the default) bills nothing. On a Ray pool,
``cpu_slots`` does not apply (each node offers its ``device_resource``) and ``slot_memory_gb`` is each
device's memory (default: a CPU slot's share of its node's memory; set it to the GPUs' memory on GPU nodes).
``admins`` is checked by ``onegpu cancel`` itself; on PostgreSQL, docs/postgres-roles.md makes the database enforce it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import platformdirs
import torch

from onegpu.errors import UsageError
from onegpu.settings import settings

CPU_SLOTS = 4
_HOST = socket.gethostname()
_EXAMPLES = {"address": '"10.0.0.1:6379"', "device_resource": '"GPU"'}
HOME_FIX = "point ONEGPU_HOME at a directory you can write to (it is created if missing)"


def onegpu_home() -> Path:
    """``$ONEGPU_HOME``, else the user's data directory for onegpu; a file there is a one-line UsageError."""
    path = settings().home or Path(platformdirs.user_data_dir("onegpu"))
    if path.exists() and not path.is_dir():
        raise UsageError(f"{_home_named(path)} is a file, not a directory: {HOME_FIX}")
    return path


def writable_home(home: Path | None = None) -> Path:
    """onegpu's home, created if missing, once it is known that files can be written there."""
    home = home or onegpu_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=home).close()
    except OSError as exc:
        raise UsageError(f"{_home_named(home)} cannot be written ({exc.strerror}): {HOME_FIX}") from None
    return home


def _home_named(home: Path) -> str:
    return f"ONEGPU_HOME={home}" if settings().home else f"onegpu's home {home} (ONEGPU_HOME unset)"


@dataclass(frozen=True)
class Device:
    index: int  # in the ledger: the pool's device ids are stable while its nodes come and go
    name: str
    memory_gb: float
    kind: str  # "cpu" (a CPU slot) or the accelerator type ("cuda", ...)
    node: str = ""  # the machine it is on: this host's name, or a Ray node's id
    host: str = ""  # that machine's address or name


@dataclass(frozen=True)
class PoolConfig:
    devices: tuple[Device, ...]
    price_per_device_hour: float = 0.0
    lease_ttl_s: float = 30.0
    database_url: str | None = None
    flavors: tuple[tuple[str, int], ...] = ()  # overrides: (name, device count)
    path: Path | None = None
    backend: str = "local"  # or "ray"
    address: str | None = None  # the Ray cluster's
    device_resource: str = "GPU"  # the Ray resource one device is
    slot_memory_gb: float | None = None
    cpu_slots: int = CPU_SLOTS

    @property
    def nodes(self) -> dict[str, tuple[Device, ...]]:
        """The pool's devices by node, in the order of the pool."""
        found: dict[str, tuple[Device, ...]] = {}
        for device in self.devices:
            found[device.node] = (*found.get(device.node, ()), device)
        return found

    def node_of(self) -> dict[int, str]:
        """Each device id's node."""
        return {device.index: device.node for device in self.devices}

    admins: tuple[str, ...] = ()  # OS users who may cancel any job


def load_pool(home: Path | None = None) -> PoolConfig:
    """The pool: ``pool.toml``'s settings and the devices its backend has now (``pool/backend.py``)."""
    pool = pool_settings(home)
    from onegpu.pool.backend import pool_backend

    devices = pool_backend(pool).devices(pool)
    if pool.flavors and min(count for _, count in pool.flavors) > len(devices):
        name, count = pool.flavors[0]
        raise UsageError(
            f"{pool.path}: [flavors] {name} = {count}: this pool has {len(devices)} devices; "
            f"add a flavor of at most {len(devices)} devices"
        )
    return replace(pool, devices=devices)


def pool_settings(home: Path | None = None) -> PoolConfig:
    """``pool.toml``'s settings alone, without asking the backend for devices (no Ray connection): enough for
    the ledger and prices."""
    home = home or onegpu_home()
    path = home / "pool.toml"
    raw: dict = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path} is not valid TOML ({exc}): fix it, or delete it for the defaults") from None
    known = {"cpu_slots", "slot_memory_gb", "price_per_device_hour", "lease_ttl_s", "database_url", "flavors"}
    known |= {"backend", "address", "device_resource", "admins"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UsageError(f"{path}: unknown key {unknown[0]!r}; known keys are {', '.join(sorted(known))}")

    def number(key: str, default: float, *, whole: bool = False, zero: bool = False) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value == 0 and not zero:
            raise UsageError(f"{path}: {key} = {value!r}: give {'0 or ' if zero else ''}a positive number")
        if whole and int(value) != value:
            raise UsageError(f"{path}: {key} = {value!r}: give a whole number")
        return value

    backend = raw.get("backend", "local")
    if backend not in ("local", "ray"):
        raise UsageError(f'{path}: backend = {backend!r}: use "local" (this machine) or "ray" (a Ray cluster)')
    for key in ("address", "device_resource"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key]):
            raise UsageError(f"{path}: {key} = {raw[key]!r}: give a string, e.g. {_EXAMPLES[key]}")
    slot_memory = float(number("slot_memory_gb", 1)) if "slot_memory_gb" in raw else None
    slots = int(number("cpu_slots", CPU_SLOTS, whole=True))
    flavors = raw.get("flavors", {})
    if not isinstance(flavors, dict) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in flavors.values()
    ):
        raise UsageError(f"{path}: [flavors] maps names to device counts (whole numbers >= 1)")
    url = settings().database_url or raw.get("database_url")
    return PoolConfig(
        devices=(),
        price_per_device_hour=float(number("price_per_device_hour", 0.0, zero=True)),
        lease_ttl_s=float(number("lease_ttl_s", settings().lease_ttl_s or 30.0)),
        database_url=url,
        flavors=tuple(sorted(flavors.items(), key=lambda item: item[1])),
        path=path,
        backend=backend,
        address=raw.get("address") or os.environ.get("RAY_ADDRESS") or "auto",
        device_resource=raw.get("device_resource", "GPU"),
        slot_memory_gb=slot_memory,
        cpu_slots=slots,
        admins=_admins(raw, path=path),
    )


def this_machine(pool: PoolConfig) -> tuple[Device, ...]:
    """This machine's accelerators, or ``cpu_slots`` CPU slots (each a share of its memory) when it has none."""
    if torch.accelerator.is_available():
        kind = torch.accelerator.current_accelerator().type
        return tuple(_accelerator(kind, i) for i in range(torch.accelerator.device_count()))
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    memory = pool.slot_memory_gb or float(max(1, int(total_gb // pool.cpu_slots)))
    return tuple(
        Device(index=i, name="CPU slot", memory_gb=memory, kind="cpu", node=_HOST, host=_HOST)
        for i in range(pool.cpu_slots)
    )


def _admins(raw: dict, *, path: Path) -> tuple[str, ...]:
    admins = raw.get("admins", [])
    if not isinstance(admins, list) or not all(isinstance(name, str) and name for name in admins):
        raise UsageError(f'{path}: admins = {admins!r}: give a list of user names, e.g. admins = ["alice", "bob"]')
    return tuple(admins)


def _accelerator(kind: str, index: int) -> Device:
    name, memory = kind, 0.0
    if kind == "cuda":
        properties = torch.cuda.get_device_properties(index)
        name, memory = properties.name, properties.total_memory / 1e9
    return Device(index=index, name=name, memory_gb=round(memory, 1), kind=kind, node=_HOST, host=_HOST)
