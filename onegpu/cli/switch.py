"""``onegpu switch [FLAVOR] [--job JOB]``: choose how many devices stand behind the virtual device, or a running
job."""

from __future__ import annotations

from typing import Annotated

import typer

from onegpu.cli.one_line import one_line_errors
from onegpu.cli.resize import resize_job
from onegpu.pool.config import load_pool
from onegpu.pool.flavors import all_flavors, current_flavor, find_flavor, switch_flavor


def switch(
    flavor: Annotated[
        str | None, typer.Argument(help="The flavor, e.g. Large or Large.24GB; none: choose from a menu.")
    ] = None,
    job: Annotated[
        str | None, typer.Option("--job", help="Move this running job to the flavor (as onegpu resize does).")
    ] = None,
) -> None:
    """Resize the virtual device: the flavor decides how many workers your jobs run on."""
    pool = load_pool()
    if flavor is None:
        flavor = _menu(pool)
        if flavor is None:
            return
    if job is not None:
        resize_job(pool, job=job, workers=find_flavor(pool, flavor).devices)
        return
    chosen = switch_flavor(pool, flavor)
    typer.echo(f"onegpu: the virtual device is now {chosen.name} ({chosen.devices} x {pool.devices[0].name})")


def _menu(pool) -> str | None:
    """A numbered menu of the flavors, the current one starred; the chosen name, or None on q."""
    flavors, current = all_flavors(pool), current_flavor(pool)
    typer.echo(
        f"Flavors of this pool ({len(pool.devices)} x {pool.devices[0].name}, {pool.devices[0].memory_gb:g} GB each):"
    )
    for number, flavor in enumerate(flavors, start=1):
        star = "*" if flavor == current else " "
        typer.echo(f"  {star} {number}) {flavor.name:16} {flavor.devices} device{'s' if flavor.devices > 1 else ''}")
    while True:
        try:
            answer = input(f"Choose 1-{len(flavors)}, or q to quit: ").strip().lower()
        except EOFError:
            return None
        if answer in ("q", "quit", ""):
            return None
        if answer.isdigit() and 1 <= int(answer) <= len(flavors):
            return flavors[int(answer) - 1].name
        typer.echo(f"  {answer!r} is not on the menu")


def register(app: typer.Typer) -> None:
    app.command("switch")(one_line_errors(switch))
