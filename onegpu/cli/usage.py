"""``onegpu usage [--since DATE] [--by job|user|day|interval] [--json]``: device-minutes and cost."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from onegpu.cli.one_line import one_line_errors
from onegpu.errors import UsageError
from onegpu.pool.config import load_pool
from onegpu.pool.lease import pool_ledger
from onegpu.pool.ledger import Interval

GROUPS = ("job", "user", "day", "interval")


def usage(
    since: Annotated[
        str | None, typer.Option(help="Only minutes held from this date on (YYYY-MM-DD, or ISO time, UTC).")
    ] = None,
    by: Annotated[
        str,
        typer.Option(
            help="Group by job, user, day (UTC; a lease over midnight counts on both days) or interval (each "
            "stretch of a job at one size: a resized job has one per size)."
        ),
    ] = "job",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Device-minutes held (each device billed per started minute while held), and their cost."""
    if by not in GROUPS:
        raise UsageError(f"--by {by!r}: group by one of {', '.join(GROUPS)}")
    start = _parse_since(since)
    pool = load_pool()
    intervals = pool_ledger(pool).intervals(since=start)
    price = pool.price_per_device_hour
    if by == "interval":
        _print_sized(sized_intervals(intervals), since=start or 0.0, price=price, as_json=as_json)
        return
    rows: dict[str, int] = {}
    for interval in intervals:
        for key, minutes in _billed(interval, by=by, since=start or 0.0):
            if minutes:
                rows[key] = rows.get(key, 0) + minutes
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


@dataclass(frozen=True)
class Sized:
    """A stretch of a job's time at one number of devices, and the device intervals it bills."""

    job: str
    start: float
    end: float
    devices: int
    held: tuple[Interval, ...]

    def billed_minutes(self, *, since: float = 0.0) -> int:
        """Its minutes of every device, each started minute once (as the job's total counts them)."""
        return sum(i.billed_minutes_between(max(self.start, since), self.end) for i in self.held)


def sized_intervals(intervals: list[Interval]) -> list[Sized]:
    """Each job's time cut where its number of devices changed (``onegpu resize``), earliest first; a job
    restarted by ``--max-restarts`` keeps its devices and stays one stretch."""
    jobs: dict[str, list[Interval]] = {}
    for interval in intervals:
        jobs.setdefault(interval.job, []).append(interval)
    found: list[Sized] = []
    for job, held in jobs.items():
        moments = sorted({moment for i in held for moment in (i.start, i.end)})
        for start, end in zip(moments, moments[1:]):
            count = sum(1 for i in held if i.start <= start and i.end >= end)
            last = found[-1] if found and found[-1].job == job else None
            if last is not None and last.devices == count and last.end == start:
                found[-1] = Sized(job, last.start, end, count, last.held)
            elif count:
                found.append(Sized(job, start, end, count, tuple(held)))
    return sorted(found, key=lambda s: (s.start, s.job))


def _print_sized(stretches: list[Sized], *, since: float, price: float, as_json: bool) -> None:
    rows = [
        {"job": s.job, "start": _utc(s.start), "end": _utc(s.end), "devices": s.devices,
         "device_minutes": s.billed_minutes(since=since), "cost": round(s.billed_minutes(since=since) / 60 * price, 4)}
        for s in stretches
        if s.end > since  # a stretch shows though no minute began in it: its devices' minutes began before
    ]  # fmt: skip
    total = sum(row["device_minutes"] for row in rows)
    if as_json:
        typer.echo(json.dumps({"by": "interval", "price_per_device_hour": price, "rows": rows,
                               "total_device_minutes": total, "total_cost": round(total / 60 * price, 4)}, indent=2))  # fmt: skip
        return
    typer.echo(f"{'job':16} {'from (UTC)':19} {'to':8} {'devices':>7} {'device-minutes':>14} {'cost':>10}")
    for row in rows:
        typer.echo(f"{row['job']:16} {row['start'][:19]:19} {row['end'][11:19]:8} {row['devices']:7} "
                   f"{row['device_minutes']:14} {row['cost']:10.2f}")  # fmt: skip
    typer.echo(f"{'total':61} {total:14} {total / 60 * price:10.2f}   (at {price:g} per device-hour)")


def _utc(moment: float) -> str:
    return datetime.fromtimestamp(moment, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _billed(interval: Interval, *, by: str, since: float) -> Iterator[tuple[str, int]]:
    """The interval's billed minutes from ``since`` on, under its job, its user, or each UTC day they fall in."""
    if by != "day":
        yield (interval.job if by == "job" else interval.user), interval.billed_minutes_between(since, math.inf)
        return
    day = datetime.fromtimestamp(max(interval.start, since), tz=UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    while day.timestamp() < interval.end:
        midnight = (day + timedelta(days=1)).timestamp()
        yield day.strftime("%Y-%m-%d"), interval.billed_minutes_between(max(day.timestamp(), since), midnight)
        day += timedelta(days=1)


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
    app.command("usage")(one_line_errors(usage))
