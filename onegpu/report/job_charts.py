"""The run report's charts, from a job's per-step metrics (torchtitan's names), its plan's prediction and its
measured pipeline timeline (a Chrome trace). Each returns a figure, or None when there is nothing to draw."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from onegpu.plan import Plan
from onegpu.report.charts import PALETTE, figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOSS, GRAD_NORM, STEP_TIME = "loss_metrics/global_avg_loss", "grad_norm", "time_metrics/end_to_end(s)"
TOKENS, SAMPLES = "throughput(tps)", "throughput(sps)"
PEAK_PER_WORKER, MAX_ACTIVE = "memory/peak_per_worker(GiB)", "memory/max_active(GiB)"
GIB = 2**30
# a timeline event's kind, from its category or name: forward, backward, weight gradients, communication, other
COMM = "send / recv"
KIND_COLOURS = {"forward": "#4c72b0", "backward": "#dd8452", "backward weight": "#937860", COMM: "#8c8c8c",
                "loss, other": "#55a868"}  # fmt: skip
LABELLED_EVENTS = 160  # up to this many events, each bar carries its name (micro-batch)


def series(metrics: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that have a number under ``key``."""
    rows = [(row["step"], row[key]) for row in metrics if isinstance(row.get(key), int | float)]
    return [s for s, _ in rows], [v for _, v in rows]


def runs(metrics: list[dict[str, Any]], key: str) -> list[tuple[list[float], list[float]]]:
    """:func:`series` cut where the step count starts again (a script that prepares again, a restarted job)."""
    steps, values = series(metrics, key)
    cuts = [0] + [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]] + [len(steps)]
    return [(steps[a:b], values[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]


def loss_chart(metrics: list[dict[str, Any]]) -> Figure | None:
    """The global loss per step, and the gradient norm on a second axis (dotted) when the loop clips."""
    losses = runs(metrics, LOSS)
    if not losses:
        return None
    drawn = figure(width=6.4, height=3.4)
    axes = drawn.subplots()
    _plot_runs(axes, losses, label="loss")
    axes.set(xlabel="step", ylabel="loss", title="loss")
    norms = runs(metrics, GRAD_NORM)
    if norms:
        _plot_runs(axes.twinx(), norms, label="gradient norm", linestyle=":").set_ylabel("gradient norm")
    drawn.legend(loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    _whole_steps(axes)
    return drawn


def throughput_chart(metrics: list[dict[str, Any]], plan: Plan | None) -> Figure | None:
    """Tokens (or samples) per second per step, against the plan's predicted tokens per second."""
    key, unit = (TOKENS, "tokens/s") if series(metrics, TOKENS)[0] else (SAMPLES, "samples/s")
    measured = runs(metrics, key)
    if not measured:
        return None
    drawn = figure(width=6.4, height=3.4)
    axes = drawn.subplots()
    _plot_runs(axes, measured, label="measured")
    if key == TOKENS and plan is not None and plan.predicted is not None:
        axes.axhline(plan.predicted.tokens_per_s, color="black", linestyle="--", linewidth=1, label="predicted")
    axes.legend(fontsize=8)
    axes.set(xlabel="step", ylabel=unit, title=f"throughput ({unit})", ylim=(0, None))
    if max(v for _, values in measured for v in values) >= 1000:
        axes.yaxis.set_major_formatter("{x:,.0f}")
    _whole_steps(axes)
    return drawn


def _plot_runs(axes: Any, found: list[tuple[list[float], list[float]]], *, label: str, linestyle: str = "-") -> Any:
    """Each run a line of its own colour, named by its order when there are several."""
    for index, (steps, values) in enumerate(found):
        named = f"{label} (run {index + 1})" if len(found) > 1 else label
        marker = "." if len(steps) < 60 else None
        axes.plot(steps, values, color=PALETTE[index % len(PALETTE)], linestyle=linestyle, marker=marker, label=named)
    return axes


def peak_per_worker(metrics: list[dict[str, Any]]) -> list[float]:
    """Each worker's peak memory (GiB) over the steps recorded so far."""
    peaks: list[float] = []
    for row in metrics:
        for rank, value in enumerate(row.get(PEAK_PER_WORKER) or ()):
            if isinstance(value, int | float):
                peaks += [0.0] * (rank + 1 - len(peaks))
                peaks[rank] = max(peaks[rank], value)
    return peaks


def memory_chart(metrics: list[dict[str, Any]], plan: Plan | None) -> Figure | None:
    """Each worker's measured peak memory, against the plan's predicted memory per device."""
    peaks = peak_per_worker(metrics)
    if not peaks:
        return None
    drawn = figure(width=6.4, height=3.4)
    axes = drawn.subplots()
    bars = axes.bar([f"rank {r}" for r in range(len(peaks))], peaks, color=PALETTE[4], label="measured peak")
    axes.bar_label(bars, fmt="%.2f", fontsize=8)
    if plan is not None and plan.predicted is not None:
        predicted = plan.predicted.memory_per_device_bytes / GIB
        axes.axhline(predicted, color="black", linestyle="--", linewidth=1, label=f"predicted {predicted:.2f} GiB")
        axes.set_ylim(0, max(max(peaks), predicted) * 1.15)
        axes.legend(fontsize=8)
    axes.set(ylabel="GiB", title="peak memory per worker (GiB)")
    axes.grid(axis="y", alpha=0.3)
    return drawn


def timeline_chart(trace: dict[str, Any]) -> Figure | None:
    """A Gantt chart of a Chrome trace's complete events ("X"), one row per process (a rank): its computations
    full height, its messages (send, receive) as a thin strip under them."""
    events = [e for e in trace.get("traceEvents", ()) if e.get("ph") == "X" and "ts" in e and "dur" in e]
    if not events:
        return None
    ranks = sorted({e.get("pid", 0) for e in events}, key=str)
    start = min(float(e["ts"]) for e in events)
    span = max(float(e["ts"]) + float(e["dur"]) for e in events) - start
    computing = sum(1 for e in events if event_kind(e) != COMM)
    drawn = figure(width=12, height=1.5 + 0.55 * len(ranks))
    axes = drawn.subplots()
    for row, rank in enumerate(ranks):
        mine = [e for e in events if e.get("pid", 0) == rank]
        for kind, colour in KIND_COLOURS.items():
            spans = [((float(e["ts"]) - start) / 1e3, float(e["dur"]) / 1e3) for e in mine if event_kind(e) == kind]
            place = (row + 0.24, 0.14) if kind == COMM else (row - 0.38, 0.58)
            if spans:
                axes.broken_barh(spans, place, facecolors=colour, edgecolor="white", linewidth=0.3)
        for e in mine if computing <= LABELLED_EVENTS else ():
            if event_kind(e) != COMM and float(e["dur"]) >= span / 50:  # a name only where it fits
                middle = (float(e["ts"]) - start + float(e["dur"]) / 2) / 1e3
                axes.text(
                    middle, row - 0.09, str(e.get("name", "")), ha="center", va="center", fontsize=6, color="white"
                )
    names = _process_names(trace.get("traceEvents", ()))
    axes.set_yticks(range(len(ranks)), [names.get(rank) or f"rank {rank}" for rank in ranks])
    axes.set_ylim(len(ranks) - 0.5, -0.5)  # rank 0 on top
    axes.set(xlabel="ms since the first event", title="pipeline timeline (measured)")
    for kind, colour in KIND_COLOURS.items():
        axes.bar(0, 0, color=colour, label=kind)
    drawn.legend(loc="outside lower center", ncol=len(KIND_COLOURS), fontsize=8, frameon=False)
    axes.grid(axis="x", alpha=0.3)
    return drawn


def _whole_steps(axes: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)


def event_kind(event: dict[str, Any]) -> str:
    """The event's kind in :data:`KIND_COLOURS`, from its category or, failing that, its name (F3, B3, W3)."""
    text = f"{event.get('cat', '')} {event.get('name', '')}".lower()
    for kind, marks in (
        (COMM, ("comm", "send", "recv", "all_reduce", "allreduce", "p2p")),
        ("backward weight", ("weight",)),
        ("backward", ("backward", "bwd")),
        ("forward", ("forward", "fwd")),
    ):
        if any(mark in text for mark in marks):
            return kind
    initial = str(event.get("name", " "))[:1].upper()
    return {"F": "forward", "B": "backward", "I": "backward", "W": "backward weight"}.get(initial, "loss, other")


def _process_names(events: Any) -> dict[Any, str]:
    """The names the trace gives its processes (metadata events "M": ``rank 1 (stage 1)``)."""
    return {
        e.get("pid", 0): str((e.get("args") or {}).get("name", ""))
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
