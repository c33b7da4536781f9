"""``onegpu cancel JOB``: stop a job of yours, running or waiting, from any machine that shares the ledger."""

from __future__ import annotations

import getpass
import math
from typing import Annotated

import typer

from onegpu.cli.one_line import one_line_errors
from onegpu.errors import UsageError
from onegpu.pool.config import PoolConfig, load_pool
from onegpu.pool.lease import pool_ledger
from onegpu.pool.ledger import Ledger


def cancel(job: Annotated[str, typer.Argument(help="The job to stop (onegpu jobs lists them).")]) -> None:
    """Stop a job: a running one stops its workers and releases its devices, a waiting one leaves the line.
    Your own jobs only, unless pool.toml lists you in admins."""
    pool = load_pool()
    ledger = pool_ledger(pool)
    user = getpass.getuser()
    found = ledger.cancel(job=job, by_user=user, allowed=lambda owner: _may_cancel(pool, job=job, owner=owner))
    beat = math.ceil(pool.lease_ttl_s / 6)  # a running job looks at every renewal of its leases
    if found.state == "unknown":
        raise UsageError(f"no job {job!r} runs or waits in this pool: onegpu jobs shows {_listing(ledger)}")
    if found.state == "ended":
        raise UsageError(f"job {job} already ended{f' (cancelled by {found.earlier_by})' * bool(found.earlier_by)}")
    if found.earlier_by is not None:
        typer.echo(f"onegpu: job {job} was already cancelled by {found.earlier_by}; it stops within {beat} s")
    elif found.state == "running":
        typer.echo(f"onegpu: job {job} cancelled; its workers stop and its devices are released within {beat} s")
    else:
        typer.echo(f"onegpu: job {job} cancelled; it leaves the line within a second")


def _may_cancel(pool: PoolConfig, *, job: str, owner: str) -> None:
    """Your own jobs, or any job when pool.toml lists you in ``admins``; else a one-line refusal."""
    user = getpass.getuser()
    if owner != user and user not in pool.admins:
        raise UsageError(
            f"job {job} belongs to {owner}: you ({user}) may cancel only your own jobs; an administrator may cancel "
            f"any (add your user name to admins = [...] in {pool.path})"
        )


def _listing(ledger: Ledger) -> str:
    """The jobs ``onegpu jobs`` shows, in a few words each."""
    running = [f"{h.job} ({h.user}, running)" for h in ledger.holdings()]
    waiting = [f"{w.job} ({w.user}, waiting {w.position})" for w in ledger.waiting()]
    return ", ".join(running + waiting) or "none"


def register(app: typer.Typer) -> None:
    app.command("cancel")(one_line_errors(cancel))
