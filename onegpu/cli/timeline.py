"""``onegpu timeline JOB -o trace.json``: a pipelined job's measured timeline, as a Chrome trace (Perfetto)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from onegpu.cli.one_line import one_line_errors
from onegpu.errors import UsageError
from onegpu.report.records import job_dir
from onegpu.report.timeline import read_timeline


def timeline(
    job: Annotated[str, typer.Argument(help="A job that `onegpu run` named, or its directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the trace.")] = Path("trace.json"),
) -> None:
    """Write the forward, backward and messages every worker of a pipelined job ran, per micro-batch, as measured,
    with the measured and predicted bubble; open the file in https://ui.perfetto.dev or chrome://tracing."""
    trace = read_timeline(job_dir(job))
    if trace is None:
        raise UsageError(
            f"job {job} recorded no pipeline timeline: only pipelined plans (pp > 1) under `onegpu run` record one, "
            "from their 2nd training call"
        )
    staging = output.with_name(f".{output.name}.{os.getpid()}")
    try:
        staging.write_text(json.dumps(trace))
        os.replace(staging, output)
    except OSError as error:
        staging.unlink(missing_ok=True)
        raise UsageError(f"cannot write {output}: {error.strerror}: give a writable path with -o") from None
    info = trace["otherData"]
    workers = len({e["pid"] for e in trace["traceEvents"]})
    typer.echo(
        f"onegpu: wrote {output}: {workers} workers, {info['schedule']} schedule, {info['microbatches']} micro-batches, "
        f"calls {', '.join(map(str, info['steps']))}; bubble measured {info['bubble_measured']:.1%}, predicted "
        f"{info['bubble_predicted']:.1%} ({info['bubble_predicted_from']})"
    )


def register(app: typer.Typer) -> None:
    app.command("timeline")(one_line_errors(timeline))
