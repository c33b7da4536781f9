"""``onegpu run [--workers N] SCRIPT ARGS...``"""

from __future__ import annotations

from typing import Optional

import typer

from onegpu.launch.run import LaunchError, launch
from onegpu.launch.workers import worker_count


def run(
    script: str = typer.Argument(..., help="The training script, written for one device."),
    args: Optional[list[str]] = typer.Argument(None, help="Arguments passed to the script."),
    workers: Optional[int] = typer.Option(
        None, "--workers", "-n", help="Workers behind the virtual device (default: ONEGPU_WORKERS, else the local accelerators, else 2 on CPU)."
    ),
) -> None:
    """Run SCRIPT on N workers as if on one device."""
    try:
        code = launch(script, list(args or []), workers=worker_count(workers))
    except (LaunchError, ValueError) as exc:
        typer.echo(f"onegpu: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command(
        "run",
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
    )(run)
