"""``onegpu doctor JOB``: why a job hung, from the records and stacks its workers left when it did."""

from __future__ import annotations

from typing import Annotated

import typer

from onegpu.cli.one_line import one_line_errors
from onegpu.errors import UsageError
from onegpu.report.doctor import diagnose
from onegpu.report.records import job_dir


def doctor(
    job: Annotated[str, typer.Argument(help="A job `onegpu run` started (its name), or its directory.")],
) -> None:
    """Which worker a hung job waited for, each worker's last collectives and its Python stack."""
    try:
        directory = job_dir(job)
    except UsageError as error:
        typer.echo(f"onegpu: {error}", err=True)
        raise typer.Exit(2) from None
    found = diagnose(directory)
    if found is None:
        typer.echo(f"onegpu: job {directory.name} did not hang: its workers left no record of a stuck collective")
        return
    typer.echo(found)


def register(app: typer.Typer) -> None:
    app.command("doctor")(one_line_errors(doctor))
