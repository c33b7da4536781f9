"""``onegpu resize JOB FLAVOR|N``: move a running job to another number of devices."""

from __future__ import annotations

import socket
from typing import Annotated

import typer

from onegpu.cli.one_line import one_line_errors
from onegpu.errors import UsageError
from onegpu.launch.job_record import has_ended
from onegpu.launch.resizing import jobs_directory, request_resize, saves_state
from onegpu.pool.config import PoolConfig, load_pool
from onegpu.pool.flavors import all_flavors, find_flavor
from onegpu.pool.lease import pool_ledger


def resize(
    job: Annotated[str, typer.Argument(help="The running job (onegpu smi lists them).")],
    size: Annotated[str, typer.Argument(help="A flavor (e.g. Large) or a number of devices.")],
) -> None:
    """Move a running job to another number of devices: it saves its state at the next step boundary and its
    workers start again at the new size, where the script continues with onegpu.load_state."""
    pool = load_pool()
    resize_job(pool, job=job, workers=devices_of(pool, size))


def devices_of(pool: PoolConfig, size: str) -> int:
    """The devices ``size`` names: a flavor of the pool, or a number of devices it has."""
    if not size.lstrip("-").isdigit():
        return find_flavor(pool, size).devices
    count = int(size)
    if count < 1:
        raise UsageError(f"{count} devices: a job needs at least 1; to stop it, stop its onegpu run (Ctrl-C)")
    if count > len(pool.devices):
        largest = all_flavors(pool)[-1]
        raise UsageError(
            f"{count} devices: this pool has {len(pool.devices)}; the largest flavor is {largest.name} "
            f"({largest.devices} device{'s' if largest.devices > 1 else ''})"
        )
    return count


def resize_job(pool: PoolConfig, *, job: str, workers: int) -> None:
    """Ask ``job`` to move to ``workers`` workers, once it is known that it can."""
    holding = next((h for h in pool_ledger(pool).holdings() if h.job == job), None)
    if holding is None:
        raise UsageError(f"no running job {job!r}: onegpu smi lists the running jobs")
    if holding.host != socket.gethostname():
        raise UsageError(f"job {job} runs on {holding.host}: run onegpu resize there")
    directory = jobs_directory() / job
    if not directory.is_dir():  # its launcher could not write to onegpu's home, or uses another one
        raise UsageError(
            f"job {job} has no directory in {jobs_directory()}: resize it with the ONEGPU_HOME it runs with"
        )
    if has_ended(directory):  # a lease row its launcher left behind, of a job that ended
        raise UsageError(f"job {job} has ended: onegpu smi lists the running jobs")
    if not saves_state(directory):
        raise UsageError(
            f"job {job} cannot be resized: it does not save its state (onegpu.save_state and onegpu.load_state "
            "in its script), so it could not continue at another size; stop it and start it again with --workers"
        )
    if workers == len(holding.devices):
        typer.echo(f"onegpu: job {job} already runs on {workers} device{'s' if workers > 1 else ''}")
        return
    request_resize(directory, workers=workers)
    typer.echo(f"onegpu: job {job} moves to {workers} devices at its next step boundary (waiting for them if taken)")


def register(app: typer.Typer) -> None:
    app.command("resize", context_settings={"ignore_unknown_options": True})(one_line_errors(resize))
