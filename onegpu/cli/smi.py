"""``onegpu smi [--json] [--watch]``: the virtual device, the physical devices and jobs behind it, and each
running job's memory and utilization over the last minutes (sparklines of the ledger's samples)."""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from onegpu.cli.one_line import one_line_errors
from onegpu.errors import UsageError
from onegpu.pool.config import load_pool
from onegpu.pool.flavors import current_flavor
from onegpu.pool.lease import pool_ledger
from onegpu.pool.ledger import HISTORY_S
from onegpu.pool.ledger_rows import Stat

WIDTH = 86
BARS = "▁▂▃▄▅▆▇█"
BUCKETS = 30  # sparkline characters over the ledger's HISTORY_S: 10 s each


def smi(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh in place until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes of --watch.")] = 2.0,
    refreshes: Annotated[int | None, typer.Option(hidden=True)] = None,  # tests: stop --watch after this many
) -> None:
    """Show the virtual device: its flavor, live memory use and utilization, what stands behind it, and each
    running job's memory and utilization over the last minutes."""
    if watch and as_json:
        raise UsageError("--watch redraws the table: leave out --json (scripts can run onegpu smi --json in a loop)")
    if interval <= 0:
        raise UsageError(f"--interval {interval:g}: give a positive number of seconds")
    pool = load_pool()
    flavor = current_flavor(pool)
    ledger = pool_ledger(pool)

    def snapshot() -> tuple[dict, list]:
        holdings = ledger.holdings()
        stats = {s.device: s for s in ledger.stats()}
        return _report(pool, flavor, holdings, stats, history=ledger.history(), now=time.time()), holdings

    if as_json:
        typer.echo(json.dumps(snapshot()[0], indent=2))
    elif watch:
        _watch(lambda: "\n".join(_lines(*snapshot(), pool=pool, flavor=flavor)), interval=interval, refreshes=refreshes)
    else:
        typer.echo("\n".join(_lines(*snapshot(), pool=pool, flavor=flavor)))


def _watch(render: Callable[[], str], *, interval: float, refreshes: int | None) -> None:
    """Draw ``render()`` every ``interval`` seconds, in place on a terminal (one table after another elsewhere);
    Ctrl-C ends it, as a normal end (exit 0)."""
    console = Console()

    def frame() -> Text:
        return Text(f"onegpu smi at {time.strftime('%H:%M:%S')}, every {interval:g} s (Ctrl-C ends)\n{render()}")

    shown = 0
    try:
        if console.is_terminal:
            with Live(frame(), console=console, auto_refresh=False, transient=False) as live:
                shown = 1
                while refreshes is None or shown < refreshes:
                    time.sleep(interval)
                    live.update(frame(), refresh=True)
                    shown += 1
        else:
            while refreshes is None or shown < refreshes:
                if shown:
                    time.sleep(interval)
                typer.echo(f"{frame().plain}\n")
                shown += 1
    except KeyboardInterrupt:
        return


def _report(pool, flavor, holdings, stats, *, history: list[Stat], now: float) -> dict:
    """What ``--json`` prints: the virtual device (your jobs' memory and utilization), each device, each job (with
    its ``history``: its memory, summed over its devices, and mean utilization, every 10 s of the last minutes)."""
    job_of = {device: h for h in holdings for device in h.devices}
    mine = [d for h in holdings if h.user == getpass.getuser() for d in h.devices]
    used = sum(stats[d].memory_bytes for d in mine if d in stats) / 1e9
    reporting = [stats[d].utilization for d in mine if d in stats]
    utilization = sum(reporting) / len(reporting) if reporting else 0.0
    return {
        "virtual_device": {
            "name": "onegpu Virtual Device",
            "model": flavor.name,
            "devices": flavor.devices,
            "memory_used_gb": round(used, 2),
            "memory_total_gb": flavor.memory_gb,
            "utilization": round(utilization, 3),
        },
        "nodes": [
            {
                "node": node,
                "host": devices[0].host,
                "devices": len(devices),
                "held": sum(d.index in job_of for d in devices),
            }
            for node, devices in pool.nodes.items()
        ],
        "devices": [
            {
                "node": d.node,
                "host": d.host,
                "index": d.index,
                "name": d.name,
                "memory_gb": d.memory_gb,
                "memory_used_gb": round(stats[d.index].memory_bytes / 1e9, 2) if d.index in stats else 0.0,
                "utilization": round(stats[d.index].utilization, 3) if d.index in stats else 0.0,
                "job": job_of[d.index].job if d.index in job_of else None,
            }
            for d in pool.devices
        ],
        "jobs": [
            {
                "job": h.job,
                "user": h.user,
                "devices": list(h.devices),
                "since": h.since,
                "host": h.host,
                "pid": h.pid,
                "history": job_history([s for s in history if s.job == h.job], now=now),
            }
            for h in holdings
        ],
    }


def _lines(report: dict, holdings, *, pool, flavor) -> list[str]:
    """The table ``onegpu smi`` prints, nvidia-smi style, and each job's history."""
    used, utilization = report["virtual_device"]["memory_used_gb"], report["virtual_device"]["utilization"]
    cells = ["  Device  ", "          Name          ", "     Model     ", " Memory Usage ", " Total Memory ", " Util "]
    row = [
        "  * 0     ",
        " onegpu Virtual Device  ",
        f" {flavor.name:<14}",
        f" {used:6.1f} GB    ",
        f" {flavor.memory_gb:5g} GB     ",
        f" {utilization:4.0%} ",
    ]
    line = "+" + "-" * (sum(map(len, cells)) + len(cells) - 1) + "+"
    out = [line, "|" + "|".join(cells) + "|", line.replace("-", "="), "|" + "|".join(row) + "|", line]
    nodes = report["nodes"]
    out.append(
        f"  behind it: {flavor.devices} of {len(pool.devices)} x {pool.devices[0].name} in this pool"
        + (f", on {len(nodes)} nodes ({pool.backend} backend)" if len(nodes) > 1 else "")
    )
    if len(nodes) > 1:
        for node in nodes:
            out.append(
                f"    node {node['node'][:12]:12}  {node['host']:16} {node['devices']} devices, {node['held']} held"
            )
    out.append(f"  {'node':12} {'device':>6}  {'name':12} {'memory used':>16}  {'util':>5}  job")
    for device in report["devices"]:
        memory = f"{device['memory_used_gb']:.1f} / {device['memory_gb']:g} GB"
        out.append(
            f"  {device['node'][:12]:12} {device['index']:>6}  {device['name']:12} {memory:>16}  {device['utilization']:5.0%}  {device['job'] or '-'}"
        )
    if holdings:
        out.append(f"  jobs holding devices (memory and utilization over the last {HISTORY_S / 60:g} min):")
    for h, job in zip(holdings, report["jobs"], strict=True):
        minutes = (time.time() - h.since) / 60
        devices = ",".join(map(str, h.devices))
        out.append(f"    {h.job}  user {h.user}  devices {devices}  for {minutes:.1f} min  ({h.host}, pid {h.pid})")
        out += _history_lines(job["history"])
    return out


def _history_lines(history: list[dict]) -> list[str]:
    if not history:
        return ["      (no reports yet: its workers report every 2 s)"]
    gap = [None] * (BUCKETS - len(history))  # the points run from the job's first report to now
    memory, utilization = gap + [p["memory_used_gb"] for p in history], gap + [p["utilization"] for p in history]
    peak, last = max(p["memory_used_gb"] for p in history), history[-1]
    return [
        f"      memory {sparkline(memory, top=peak)}  {last['memory_used_gb']:.1f} GB now, {peak:.1f} GB at most",
        f"      util   {sparkline(utilization, top=1.0)}  {last['utilization']:.0%} now",
    ]


def sparkline(values: list[float | None], *, top: float) -> str:
    """One character per value, from ▁ (0) to █ (``top``); a space where there is no value."""
    return "".join(
        " " if v is None else BARS[min(len(BARS) - 1, int(len(BARS) * v / top))] if top > 0 else BARS[0] for v in values
    )


def job_history(samples: list[Stat], *, now: float) -> list[dict]:
    """A job's memory (summed over its devices) and utilization (their mean) at the end of every
    ``HISTORY_S / BUCKETS`` seconds of the last ``HISTORY_S``, from its first report on; each device counts with its
    latest report by then."""
    step, latest, points = HISTORY_S / BUCKETS, {}, []
    for bucket in range(BUCKETS):
        end = now - HISTORY_S + (bucket + 1) * step
        latest.update(
            {s.device: s for s in sorted(samples, key=lambda s: s.reported) if end - step < s.reported <= end}
        )
        if latest:
            points.append({
                "time": round(end, 3),
                "memory_used_gb": round(sum(s.memory_bytes for s in latest.values()) / 1e9, 3),
                "utilization": round(sum(s.utilization for s in latest.values()) / len(latest), 3),
            })  # fmt: skip
    return points


def register(app: typer.Typer) -> None:
    app.command("smi")(one_line_errors(smi))
