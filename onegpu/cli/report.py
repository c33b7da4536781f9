"""``onegpu report JOB [-o FILE]``: one self-contained HTML page of a job, finished or still running."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from onegpu.cli.one_line import one_line_errors


def report(
    job: Annotated[str, typer.Argument(help="A job name that `onegpu run` printed, or the job's directory.")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to write the page (default: report.html in the job's directory).",
                     dir_okay=False),
    ] = None,
) -> None:  # fmt: skip
    """Write a job's report: loss, throughput and memory against the plan's prediction, the plan and why it won,
    the pipeline timeline, the devices and leases held, the hang doctor's diagnosis."""
    from onegpu.report.html import write_report  # matplotlib only when drawing
    from onegpu.report.job_record import read_record
    from onegpu.report.records import job_dir

    typer.echo(write_report(read_record(job_dir(job)), output))


def register(app: typer.Typer) -> None:
    app.command("report")(one_line_errors(report))
