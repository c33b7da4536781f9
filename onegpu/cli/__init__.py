"""The ``onegpu`` command: one module per subcommand."""

from __future__ import annotations

import typer

from onegpu.cli import cancel as cancel_command
from onegpu.cli import doctor as doctor_command
from onegpu.cli import export as export_command
from onegpu.cli import jobs as jobs_command
from onegpu.cli import plan as plan_command
from onegpu.cli import report as report_command
from onegpu.cli import resize as resize_command
from onegpu.cli import run as run_command
from onegpu.cli import smi as smi_command
from onegpu.cli import switch as switch_command
from onegpu.cli import timeline as timeline_command
from onegpu.cli import usage as usage_command

app = typer.Typer(
    name="onegpu",
    help="A cluster of accelerators that single-device PyTorch code sees as one device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
run_command.register(app)
plan_command.register(app)
smi_command.register(app)
switch_command.register(app)
resize_command.register(app)
usage_command.register(app)
jobs_command.register(app)
cancel_command.register(app)
export_command.register(app)
report_command.register(app)
timeline_command.register(app)
doctor_command.register(app)


@app.callback()
def _root() -> None:
    """A cluster of accelerators that single-device PyTorch code sees as one device."""


def main() -> None:
    app()
