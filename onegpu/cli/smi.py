"""``onegpu smi [--json]``: the virtual device, and the physical devices and jobs behind it."""

from __future__ import annotations

import getpass
import json
import time
from typing import Annotated

import typer

from onegpu.cli.one_line import one_line_errors
from onegpu.pool.config import load_pool
from onegpu.pool.flavors import current_flavor
from onegpu.pool.lease import pool_ledger

WIDTH = 86


def smi(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """Show the virtual device: its flavor, live memory use and utilization, and what stands behind it."""
    pool = load_pool()
    flavor = current_flavor(pool)
    ledger = pool_ledger(pool)
    holdings, stats = ledger.holdings(), {s.device: s for s in ledger.stats()}
    report = _report(pool, flavor, holdings, stats)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print(report, pool=pool, flavor=flavor, holdings=holdings)


def _report(pool, flavor, holdings, stats) -> dict:
    """What ``--json`` prints: the virtual device (your jobs' memory and utilization), each device, each job."""
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
            {"job": h.job, "user": h.user, "devices": list(h.devices), "since": h.since, "host": h.host, "pid": h.pid}
            for h in holdings
        ],
    }


def _print(report: dict, *, pool, flavor, holdings) -> None:
    """The table ``onegpu smi`` prints, nvidia-smi style."""
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
    typer.echo("\n".join([line, "|" + "|".join(cells) + "|", line.replace("-", "="), "|" + "|".join(row) + "|", line]))
    nodes = report["nodes"]
    typer.echo(
        f"  behind it: {flavor.devices} of {len(pool.devices)} x {pool.devices[0].name} in this pool"
        + (f", on {len(nodes)} nodes ({pool.backend} backend)" if len(nodes) > 1 else "")
    )
    if len(nodes) > 1:
        for node in nodes:
            typer.echo(
                f"    node {node['node'][:12]:12}  {node['host']:16} {node['devices']} devices, {node['held']} held"
            )
    typer.echo(f"  {'node':12} {'device':>6}  {'name':12} {'memory used':>16}  {'util':>5}  job")
    for device in report["devices"]:
        memory = f"{device['memory_used_gb']:.1f} / {device['memory_gb']:g} GB"
        typer.echo(
            f"  {device['node'][:12]:12} {device['index']:>6}  {device['name']:12} {memory:>16}  {device['utilization']:5.0%}  {device['job'] or '-'}"
        )
    if holdings:
        typer.echo("  jobs holding devices:")
        for h in holdings:
            minutes = (time.time() - h.since) / 60
            devices = ",".join(map(str, h.devices))
            typer.echo(f"    {h.job}  user {h.user}  devices {devices}  for {minutes:.1f} min  ({h.host}, pid {h.pid})")


def register(app: typer.Typer) -> None:
    app.command("smi")(one_line_errors(smi))
