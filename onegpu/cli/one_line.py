"""The one place a command's error becomes its one line on stderr and exit code 1."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from onegpu.errors import LaunchError, UsageError


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with a mistake in the input or the setup, or a failed job, shown as one line, no traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (UsageError, LaunchError) as error:
            typer.echo(f"onegpu: {error}", err=True)
            raise typer.Exit(1) from None

    return run
