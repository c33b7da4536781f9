"""A picture of a plan and its runners-up: memory per device by category, against the device's budget, and step
time by component, one stacked bar per plan (``onegpu plan --plot FILE``, and the run report)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from onegpu.plan import GB, Plan
from onegpu.report.charts import PALETTE, figure, save

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SHARDING_NAMES = {"none": "", "optimizer": "zero1", "gradients": "zero2", "parameters": "fsdp", "hybrid": "hsdp"}
OFFLOAD_NAMES = {"optimizer": "offload-opt", "parameters": "offload-params"}
SHOWN_ALTERNATIVES = 5  # runners-up drawn after the chosen plan
SHOWN_REJECTED = 3  # and the best plans of other families (those over the budget show why they lost)
MEMORY_COLOURS = {
    "parameters": "#1f77b4", "gradients": "#ff7f0e", "optimizer": "#2ca02c", "optimizer_workspace": "#98df8a",
    "framework_buffers": "#9467bd", "activations": "#d62728", "runtime": "#7f7f7f",
}  # fmt: skip
# the cost model's step components, coloured by kind: work, waiting, communication, optimizer
TIME_COLOURS = {
    "compute": "#4c72b0", "recompute": "#8fb0de", "pipeline_bubble": "#bbbbbb", "tensor_parallel_comm": "#dd8452",
    "pipeline_comm": "#f2b880", "data_parallel_comm": "#c44e52", "optimizer": "#55a868", "offload": "#8172b3",
}  # fmt: skip


def short_name(plan: Plan) -> str:
    """A plan in a few words: ``dp4 zero2``, ``dp2 tp2 pp2 1f1b×8``, ``dp8 fsdp ac=full offload-opt bf16``."""
    words = [f"dp{plan.dp}"]
    if plan.tp > 1:
        words.append(f"tp{plan.tp}")
    if plan.pp > 1:
        words += [f"pp{plan.pp}", f"{plan.schedule}×{plan.microbatches}"]
    elif plan.microbatches > 1:
        words.append(f"acc{plan.microbatches}")
    sharding = SHARDING_NAMES[plan.sharding]
    words.append(f"{sharding}/{plan.shard_group}" if plan.shard_group else sharding)
    checkpointing = plan.activation_checkpointing
    if checkpointing != "none":
        words.append("sac" if checkpointing == "selective" else f"ac={checkpointing}")
    if plan.offload != "none":
        words.append(OFFLOAD_NAMES[plan.offload])
    if plan.precision != "fp32":
        words.append(plan.precision)
    if plan.compile:
        words.append("compiled")
    return " ".join(word for word in words if word)


def compared(plan: Plan) -> list[tuple[str, Plan]]:
    """(label, plan) for the chosen plan, its best runners-up and the best rejected plans, each with a prediction
    and a distinct label; the chosen one first."""
    rows = [("chosen", plan)] + [("", p) for p in plan.alternatives[:SHOWN_ALTERNATIVES]]
    rows += [("rejected", r.plan) for r in plan.rejected[:SHOWN_REJECTED]]
    labels: dict[str, int] = {}
    out = []
    for note, candidate in rows:
        if candidate.predicted is None:
            continue
        name = short_name(candidate)
        labels[name] = labels.get(name, 0) + 1
        name += f" ({labels[name]})" if labels[name] > 1 else ""
        out.append((f"{name}  [{note}]" if note else name, candidate))
    return out


def plan_figure(plan: Plan, *, budget_bytes: float | None = None, title: str = "") -> Figure:
    """Two panels sharing the plans' rows: memory per device by category with the budget as a line, and
    predicted step time by component (each with how much slower than the chosen plan)."""
    rows = compared(plan)
    longest = max((len(label) for label, _ in rows), default=0)
    drawn = figure(width=min(9 + 0.075 * longest, 20), height=2.2 + 0.42 * max(len(rows), 1))
    memory_axes, time_axes = drawn.subplots(1, 2, sharey=True)
    labels = [label for label, _ in rows]
    memory = [c.predicted.memory_breakdown for _, c in rows]
    scale, unit = (GB, "GB") if max(sum(m.values()) for m in memory) >= GB / 2 else (1e6, "MB")
    _stacked(memory_axes, labels, memory, scale=scale, unit=unit, colours=MEMORY_COLOURS)
    memory_axes.set_title(f"memory per device, by category ({unit})", loc="left", fontsize=10)
    if budget_bytes:
        memory_axes.axvline(budget_bytes / scale, color="black", linestyle="--", linewidth=1.2)
        memory_axes.set_xlim(0, max(memory_axes.get_xlim()[1], budget_bytes / scale * 1.1))
        memory_axes.annotate(f"budget {budget_bytes / scale:.1f} {unit}", xy=(budget_bytes / scale, 1.0),
                             xycoords=("data", "axes fraction"), xytext=(3, -3), textcoords="offset points",
                             fontsize=8, va="top")  # fmt: skip
    step = rows[0][1].predicted.step_time_s
    scale, unit = (1.0, "s") if step >= 1 else (1e-3, "ms")
    notes = [f" (+{c.predicted.step_time_s / step - 1:.0%})" if c.predicted.step_time_s > 1.005 * step else ""
             for _, c in rows]  # fmt: skip
    times = [c.predicted.time_breakdown for _, c in rows]
    _stacked(time_axes, labels, times, scale=scale, unit=unit, colours=TIME_COLOURS, notes=notes)
    time_axes.set_title(f"step time, by component ({unit})", loc="left", fontsize=10)
    memory_axes.invert_yaxis()  # the chosen plan on top
    memory_axes.get_yticklabels()[0].set_fontweight("bold")
    if title:
        drawn.suptitle(title, x=0.01, ha="left", fontsize=11)
    return drawn


def plot_plan(plan: Plan, path: Path, *, budget_bytes: float | None = None, title: str = "") -> Path:
    """Draw :func:`plan_figure` to ``path`` (``.png`` or ``.svg``)."""
    return save(plan_figure(plan, budget_bytes=budget_bytes, title=title), path)


def _stacked(
    axes: Axes,
    labels: list[str],
    parts: list[dict[str, float]],
    *,
    scale: float,
    unit: str,
    colours: dict[str, str],
    notes: list[str] | None = None,
) -> None:
    """One horizontal bar per row, stacked by key (keys in first-seen order; zero and negative parts left out),
    its total (and its note) written at its end."""
    keys = [k for k in dict.fromkeys(k for row in parts for k in row) if any(row.get(k, 0) > 0 for row in parts)]
    keys.sort(key=lambda k: list(colours).index(k) if k in colours else len(colours))  # the same order in every chart
    left = [0.0] * len(labels)
    positions = range(len(labels))
    for index, key in enumerate(keys):
        widths = [max(row.get(key, 0.0), 0.0) / scale for row in parts]
        colour = colours.get(key, PALETTE[index % len(PALETTE)])
        axes.barh(positions, widths, left=left, color=colour, label=key, height=0.62)
        left = [a + b for a, b in zip(left, widths)]
    for position, total, note in zip(positions, left, notes or [""] * len(labels)):
        axes.annotate(f" {total:.3g} {unit}{note}", (total, position), va="center", fontsize=8)
    axes.set_yticks(list(positions), labels, fontsize=9)
    axes.set_xlim(0, max(left, default=0) * (1.3 if notes else 1.15) or 1)
    axes.grid(axis="x", alpha=0.3)
    axes.set_axisbelow(True)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8, frameon=False)
