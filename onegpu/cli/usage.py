"""``onegpu usage [--since DATE] [--by job|user|day] [--json]``: device-minutes and cost."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated

import typer

from onegpu.errors import UsageError
from onegpu.pool.config import load_pool
from onegpu.pool.lease import pool_ledger

GROUPS = ("job", "user", "day")


def usage(
    since: Annotated[
        str | None, typer.Option(help="Only usage after this date (YYYY-MM-DD, or ISO time, UTC).")
    ] = None,
    by: Annotated[str, typer.Option(help="Group by job, user or day (UTC, by when each lease started).")] = "job",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Device-minutes held (each device billed per started minute while held), and their cost."""
    try:
        if by not in GROUPS:
            raise UsageError(f"--by {by!r}: group by one of {', '.join(GROUPS)}")
        start = _parse_since(since)
        pool = load_pool()
        intervals = pool_ledger(pool).intervals(since=start)
    except UsageError as exc:
        typer.echo(f"onegpu: {exc}", err=True)
        raise typer.Exit(1) from None
    rows: dict[str, int] = {}
    for interval in intervals:
        if by == "day":
            key = datetime.fromtimestamp(interval.start, tz=UTC).strftime("%Y-%m-%d")
        else:
            key = interval.job if by == "job" else interval.user
        rows[key] = rows.get(key, 0) + interval.billed_minutes
    price = pool.price_per_device_hour
    table = [
        {by: key, "device_minutes": minutes, "cost": round(minutes / 60 * price, 4)} for key, minutes in rows.items()
    ]
    total = sum(rows.values())
    if as_json:
        typer.echo(json.dumps({"by": by, "price_per_device_hour": price, "rows": table, "total_device_minutes": total,
                               "total_cost": round(total / 60 * price, 4)}, indent=2))  # fmt: skip
        return
    typer.echo(f"{by:24} {'device-minutes':>14} {'cost':>10}")
    for row in table:
        typer.echo(f"{row[by]:24} {row['device_minutes']:14} {row['cost']:10.2f}")
    typer.echo(f"{'total':24} {total:14} {total / 60 * price:10.2f}   (at {price:g} per device-hour)")


def _parse_since(since: str | None) -> float | None:
    if since is None:
        return None
    try:
        moment = datetime.fromisoformat(since)
    except ValueError:
        raise UsageError(f"--since {since!r}: give a date like 2026-11-01 or 2026-11-01T12:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    value = moment.timestamp()
    if value > time.time():
        raise UsageError(f"--since {since!r} is in the future: give a past date")
    return value


def register(app: typer.Typer) -> None:
    app.command("usage")(usage)
