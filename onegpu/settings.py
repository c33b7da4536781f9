"""Every ``ONEGPU_*`` environment variable: named, parsed and documented here, read nowhere else.

``settings()`` returns them as one frozen :class:`Settings`; a malformed value is a one-line error
that names the variable and an example. The README's table of variables is checked against
``VARIABLES`` by the tests. Variables marked ``internal`` are set by ``onegpu run`` for its workers
(``worker_environment``); users set the others.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onegpu.errors import UsageError


@dataclass(frozen=True)
class Variable:
    name: str
    field: str  # the Settings attribute
    parse: Callable[[str], Any]
    default: Any
    doc: str
    example: str = ""
    hint: str = ""  # what to set it to, in a sentence ("the number of workers")
    internal: bool = False


def _number(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("a positive number")
    return value


def _whole(raw: str) -> int:
    return int(raw)  # its range is checked where it is used, with the flag that sets it too


def _flag(raw: str) -> bool:
    if raw not in ("0", "1", ""):
        raise ValueError("0 or 1")
    return raw == "1"


KINDS = {_number: "a positive number", _whole: "a whole number", _flag: "0 or 1"}


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


VARIABLES = (
    Variable("ONEGPU_HOME", "home", _path, None,
             "onegpu's directory: pool.toml, the SQLite ledger, flavors, caches (default: the user's data directory)",
             "~/onegpu"),
    Variable("ONEGPU_DATABASE_URL", "database_url", str, None,
             "the ledger: `postgresql://user@host/db` or `sqlite:///path` (default: SQLite in ONEGPU_HOME)",
             "postgresql://onegpu@db/onegpu"),
    Variable("ONEGPU_WORKERS", "workers", _whole, None,
             "workers of a job started without --workers (default: the devices of your flavor)", "2",
             "the number of workers"),
    Variable("ONEGPU_MEMORY_BUDGET_GB", "memory_budget_gb", _number, None,
             "GiB one worker may use (default: 90% of the device; on CPU, the machine's memory shared by the workers)",
             "8", "the GiB one worker may use"),
    Variable("ONEGPU_COLLECTIVE_TIMEOUT", "collective_timeout_s", _number, 600.0,
             "seconds a worker may wait inside a collective before the job is stopped with a report", "600",
             "the seconds a collective may wait"),
    Variable("ONEGPU_PRINT_ALL_RANKS", "print_all_ranks", _flag, False,
             "1: show what every worker prints, not only rank 0", "1", "1 or 0"),
    Variable("ONEGPU_MEASURE_COMPILE", "measure_compile", _flag, True,
             "0: advanced parallelization does not time torch.compile on the job's devices (blocks then stay eager "
             "unless the compile pin asks)", internal=True),
    Variable("ONEGPU_METRICS", "metrics", _flag, True,
             "0: workers of `onegpu run` record no per-step metrics (metrics.jsonl, TensorBoard, the progress line)",
             "1", "1 or 0"),
    Variable("ONEGPU_LEASE_TTL", "lease_ttl_s", _number, None,
             "seconds a job's device leases last without renewal (default: lease_ttl_s in pool.toml, else 30)", "30",
             "the seconds a lease lasts"),
    Variable("ONEGPU_LEDGER_BUSY_S", "ledger_busy_s", _number, 10.0,
             "seconds to wait for a SQLite ledger another process holds locked", "10", "the seconds to wait"),
    Variable("ONEGPU_LAUNCHED", "launched", _flag, False, "set in workers of `onegpu run`", internal=True),
    Variable("ONEGPU_LAUNCHER_PID", "launcher_pid", _whole, None,
             "the launcher's process id: its workers end with it", internal=True),
    Variable("ONEGPU_STATUS_DIR", "status_dir", _path, None,
             "where workers leave their memory and how they ended, for the launcher's report", internal=True),
    Variable("ONEGPU_LOG_DIR", "log_dir", _path, None,
             "where rank 0 writes metrics.jsonl and tensorboard/ (`onegpu run --log-dir`; default the job's "
             "directory)", internal=True),
    Variable("ONEGPU_JOB", "job", str, None, "the job whose leases a worker reports under", internal=True),
    Variable("ONEGPU_DEVICES", "devices", lambda raw: tuple(int(d) for d in raw.split(",")), (),
             "the pool's devices leased for the job, one per local worker", internal=True),
)  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """The ``ONEGPU_*`` variables of this process, parsed (None: not set, the documented default applies)."""

    home: Path | None
    database_url: str | None
    workers: int | None
    memory_budget_gb: float | None
    collective_timeout_s: float
    print_all_ranks: bool
    measure_compile: bool
    metrics: bool
    lease_ttl_s: float | None
    ledger_busy_s: float
    launched: bool
    launcher_pid: int | None
    status_dir: Path | None
    log_dir: Path | None
    job: str | None
    devices: tuple[int, ...]


def settings() -> Settings:
    """This process's settings, read from its environment (parsed once per distinct environment)."""
    return _parse(tuple(os.environ.get(v.name) for v in VARIABLES))


@functools.lru_cache(maxsize=8)
def _parse(raw: tuple[str | None, ...]) -> Settings:
    values = {}
    for variable, text in zip(VARIABLES, raw):
        if text is None or (text == "" and variable.parse is not _flag):
            values[variable.field] = variable.default
            continue
        try:
            values[variable.field] = variable.parse(text)
        except ValueError:
            kind = KINDS.get(variable.parse, "valid")
            raise UsageError(
                f"{variable.name}={text!r} is not {kind}: set it to {variable.hint or 'a valid value'}, "
                f"e.g. {variable.example}"
                if variable.example
                else f"{variable.name}={text!r} is not valid: unset it"
            ) from None
    return Settings(**values)


def worker_environment(
    *,
    job: str | None = None,
    devices: tuple[int, ...] = (),
    launcher_pid: int,
    status_dir: Path,
    log_dir: Path | None = None,
) -> dict[str, str]:
    """The internal variables ``onegpu run`` gives its workers."""
    out = {"ONEGPU_LAUNCHED": "1", "ONEGPU_LAUNCHER_PID": str(launcher_pid), "ONEGPU_STATUS_DIR": str(status_dir),
           "ONEGPU_LOG_DIR": str(log_dir or status_dir)}  # fmt: skip
    if job is not None:
        out.update(ONEGPU_JOB=job, ONEGPU_DEVICES=",".join(map(str, devices)))
    return out


def markdown_table() -> str:
    """The README's table of the variables users set."""
    rows = ["| variable | meaning |", "| --- | --- |"]
    rows += [f"| `{v.name}` | {v.doc} |" for v in VARIABLES if not v.internal]
    return "\n".join(rows)
