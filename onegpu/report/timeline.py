"""A pipelined job's measured timeline as a Chrome trace (Perfetto, ``chrome://tracing``), and its bubble.

The workers wrote their events to ``<job dir>/timeline/rank-<N>.json`` (:mod:`onegpu.runtime.timeline`). Each
worker is a process of the trace (``rank N (stage s)``), each kind of event a thread of it (forward, backward,
loss, send, recv, ...); times are microseconds since the first event. ``otherData`` holds the schedule, the
micro-batches, how the clocks were aligned, and the bubble: measured (the share of each recorded call's span, from
the first computation on any worker to the last, that a worker spent not computing, averaged over workers and
calls) and predicted (the plan's cost model when ``plan.json`` holds its time breakdown, else the schedule's
theory).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onegpu.errors import UsageError
from onegpu.report.records import read_plan

DIRECTORY = "timeline"
COMPUTE = ("forward", "backward", "backward input", "backward weight", "loss")
THREADS = (*COMPUTE, "recv forward", "recv backward", "send forward", "send backward")
LETTERS = {"forward": "F", "backward": "B", "backward input": "I", "backward weight": "W", "loss": "L"}
INTERLEAVED = ("interleaved", "zero-bubble")


def read_records(directory: Path) -> list[dict[str, Any]]:
    """Every worker's timeline record, by rank; [] when the job recorded none."""
    records = []
    for path in sorted((directory / DIRECTORY).glob("rank-*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(records, key=lambda r: r["rank"])


def read_timeline(directory: Path) -> dict[str, Any] | None:
    """The job's measured pipeline timeline as a Chrome-trace dict, or None when it recorded none."""
    records = [r for r in read_records(directory) if r.get("events")]
    if not records:
        return None
    shifts, alignment = _clock_shifts(records)
    origin = min(e["start_ns"] + shifts[r["rank"]] for r in records for e in r["events"])
    events: list[dict[str, Any]] = []
    for record in records:
        events += _process(record, shift=shifts[record["rank"]] - origin)
    first = records[0]
    predicted, source = predicted_bubble(directory, first)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "bubble_measured": measured_bubble(records, shifts=shifts),
            "bubble_predicted": predicted,
            "bubble_predicted_from": source,
            "schedule": first["schedule"],
            "microbatches": first["microbatches"],
            "pp": first["pp"],
            "steps": sorted({s["step"] for r in records for s in r["steps"]}),
            "clocks": alignment,
            "origin_unix_us": origin / 1000,
        },
    }


def _clock_shifts(records: list[dict[str, Any]]) -> tuple[dict[int, int], str]:
    """Nanoseconds to add to each rank's times: none on one host (one clock); across hosts, each clock is moved so
    that the barrier every worker left together before its first recorded call is at the same time."""
    if len({r["host"] for r in records}) == 1:
        return {r["rank"]: 0 for r in records}, "one host: its clock"
    reference = records[0]["barrier_ns"]
    return {r["rank"]: reference - r["barrier_ns"] for r in records}, "several hosts: aligned at a barrier"


def _process(record: dict[str, Any], *, shift: int) -> list[dict[str, Any]]:
    rank, stages = record["rank"], record["stages"]
    label = f"rank {rank} (stage{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages))})"
    out: list[dict[str, Any]] = [
        {"ph": "M", "pid": rank, "tid": 0, "name": "process_name", "args": {"name": label}},
        {"ph": "M", "pid": rank, "tid": 0, "name": "process_sort_index", "args": {"sort_index": rank}},
    ]
    kinds = {e["kind"] for e in record["events"]}
    for tid, kind in enumerate(THREADS):
        if kind in kinds:
            out.append({"ph": "M", "pid": rank, "tid": tid, "name": "thread_name", "args": {"name": kind}})
    for event in record["events"]:
        kind = event["kind"]
        args = {"microbatch": event["microbatch"], "stage": event["stage"], "step": event["step"]}
        args.update({key: event[key] for key in ("peer", "phase") if key in event})
        name = f"{LETTERS.get(kind, kind)}{event['microbatch']}"
        if kind not in LETTERS:  # a message: "send F3", "post recv B0" (the wait is what idles the worker)
            direction, of = kind.split(" ", 1)
            name = f"{'post ' if event.get('phase') == 'post' else ''}{direction} {LETTERS[of]}{event['microbatch']}"
        out.append({
            "ph": "X", "pid": rank, "tid": THREADS.index(kind) if kind in THREADS else len(THREADS), "cat": kind,
            "name": name, "ts": (event["start_ns"] + shift) / 1000, "dur": (event["end_ns"] - event["start_ns"]) / 1000,
            "args": args,
        })  # fmt: skip
    return out


def measured_bubble(records: list[dict[str, Any]], *, shifts: dict[int, int] | None = None) -> float | None:
    """The share of a recorded call's span (first computation on any worker to the last) that workers spent not
    computing (waiting for a neighbour, or with nothing to do), averaged over workers and calls."""
    shifts = shifts or {r["rank"]: 0 for r in records}
    fractions = []
    for step in sorted({e["step"] for r in records for e in r["events"]}):
        busy = {
            r["rank"]: _union(
                [
                    (e["start_ns"] + shifts[r["rank"]], e["end_ns"] + shifts[r["rank"]])
                    for e in r["events"]
                    if e["step"] == step and e["kind"] in COMPUTE
                ]  # fmt: skip
            )
            for r in records
        }
        spans = [interval for intervals in busy.values() for interval in intervals]
        if not spans:
            continue
        span = max(end for _, end in spans) - min(start for start, _ in spans)
        if span <= 0:
            continue
        fractions += [1 - sum(end - start for start, end in intervals) / span for intervals in busy.values()]
    return sum(fractions) / len(fractions) if fractions else None


def _union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def predicted_bubble(directory: Path, record: dict[str, Any]) -> tuple[float | None, str]:
    """The bubble the plan predicts, and from what: the cost model's ``pipeline_bubble`` over the pipeline's
    time (computation, its communication, the bubble) when ``plan.json`` has the time breakdown; else the
    schedule's theory."""
    try:
        plan = read_plan(directory)
    except UsageError:  # a plan.json this version cannot read: the timeline is still worth showing
        plan = None
    times = plan.predicted.time_breakdown if plan is not None and plan.predicted is not None else {}
    if times.get("pipeline_bubble"):
        parts = ("compute", "recompute", "tensor_parallel_comm", "pipeline_comm", "pipeline_bubble")
        return times["pipeline_bubble"] / sum(times.get(p, 0.0) for p in parts), "cost model (plan.json)"
    return schedule_bubble(record["schedule"], pp=record["pp"], microbatches=record["microbatches"]), "schedule theory"


def schedule_bubble(schedule: str, *, pp: int, microbatches: int) -> float:
    """The idle share of a balanced pipeline with free messages: ``b / (m + b)`` for ``b`` idle micro-batch slots,
    ``pp - 1`` for GPipe and 1F1B, half as many interleaving two stages per worker (Narayanan et al. 2021), a third
    of that for zero-bubble (Qi et al. 2024), as the cost model counts them (planner/cost_model.py)."""
    slots = (pp - 1) / (2 if schedule in INTERLEAVED else 1)
    if schedule == "zero-bubble":
        slots /= 3
    return slots / (microbatches + slots)
