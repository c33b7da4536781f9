"""``onegpu run [--workers N] [--max-restarts N] [--log-dir DIR] SCRIPT ARGS...``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from onegpu.cli.one_line import one_line_errors
from onegpu.launch.workers import worker_count

WORKERS_HELP = "Workers behind the virtual device (default: ONEGPU_WORKERS, else your flavor's devices)."


def run(
    script: Annotated[str, typer.Argument(help="The training script, written for one device.")],
    args: Annotated[list[str] | None, typer.Argument(help="Arguments passed to the script.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", "-n", help=WORKERS_HELP)] = None,
    no_wait: Annotated[
        bool,
        typer.Option("--no-wait", help="Fail at once when the pool cannot serve the job now, instead of queueing."),
    ] = False,
    max_restarts: Annotated[
        int,
        typer.Option(
            "--max-restarts",
            help="Restart all workers up to N times when one fails; the script resumes with onegpu.load_state.",
        ),
    ] = 0,
    log_dir: Annotated[
        Path | None,
        typer.Option(
            "--log-dir",
            help="Where the job's per-step metrics go (metrics.jsonl, tensorboard/); default: the job's directory, "
            "$ONEGPU_HOME/jobs/<job>.",
        ),
    ] = None,
) -> None:
    """Run SCRIPT on N workers as if on one device."""
    from onegpu.launch.run import launch  # torchelastic only when running

    count = worker_count(workers)
    code = launch(script, list(args or []), workers=count, wait=not no_wait, max_restarts=max_restarts, log_dir=log_dir)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command(
        "run",
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
    )(one_line_errors(run))
