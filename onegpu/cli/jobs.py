"""``onegpu jobs [--json]``: the pool's running jobs and the jobs waiting in line, with their users."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated

import typer

from onegpu.cli.one_line import one_line_errors
from onegpu.pool.config import PoolConfig, load_pool
from onegpu.pool.flavors import all_flavors
from onegpu.pool.lease import pool_ledger
from onegpu.pool.ledger import Holding, Waiting


def jobs(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """List the jobs of the pool: those holding devices, and those waiting in line (first come, first served)."""
    pool = load_pool()
    ledger = pool_ledger(pool)
    report = jobs_report(pool, running=ledger.holdings(), waiting=ledger.waiting())
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    elif not report["running"] and not report["waiting"]:
        typer.echo("onegpu: no job runs or waits in this pool")
    else:
        _print(report)


def flavor_of(pool: PoolConfig, devices: int) -> str:
    """The name of the pool's flavor of ``devices`` devices, else "N devices"."""
    named = next((f.name for f in all_flavors(pool) if f.devices == devices), None)
    return named or f"{devices} device{'s' if devices > 1 else ''}"


def jobs_report(pool: PoolConfig, *, running: list[Holding], waiting: list[Waiting]) -> dict:
    """What ``--json`` prints: running jobs (oldest first) and waiting ones (in the order they will be served)."""
    now = time.time()
    return {
        "running": [
            {"job": h.job, "user": h.user, "devices": list(h.devices), "flavor": flavor_of(pool, len(h.devices)),
             "since": h.since, "minutes": round((now - h.since) / 60, 1), "host": h.host, "pid": h.pid}
            for h in running
        ],
        "waiting": [
            {"position": w.position, "job": w.job, "user": w.user, "devices": w.devices,
             "flavor": flavor_of(pool, w.devices), "since": w.since, "minutes": round((now - w.since) / 60, 1)}
            for w in waiting
        ],
    }  # fmt: skip


def _print(report: dict) -> None:
    if report["running"]:
        typer.echo(
            f"running:\n  {'job':16} {'user':12} {'devices':8} {'flavor':14} {'since (UTC)':11} {'min':>6}  host"
        )
    for job in report["running"]:
        since = datetime.fromtimestamp(job["since"], tz=UTC).strftime("%H:%M:%S")
        devices = ",".join(map(str, job["devices"]))
        typer.echo(f"  {job['job']:16} {job['user']:12} {devices:8} {job['flavor']:14} {since:11} "
                   f"{job['minutes']:6.1f}  {job['host']} (pid {job['pid']})")  # fmt: skip
    if report["waiting"]:
        typer.echo(f"waiting (served in this order):\n  {'#':>2} {'job':16} {'user':12} {'wants':10} {'flavor':14} "
                   f"{'min':>6}")  # fmt: skip
    for job in report["waiting"]:
        wants = f"{job['devices']} device{'s' if job['devices'] > 1 else ''}"
        typer.echo(f"  {job['position']:>2} {job['job']:16} {job['user']:12} {wants:10} {job['flavor']:14} "
                   f"{job['minutes']:6.1f}")  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("jobs")(one_line_errors(jobs))
