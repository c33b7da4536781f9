"""``onegpu plan --model M --global-batch-size B --seq-len S --cluster C [pins] [--json] [--plot FILE]``"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from onegpu.cli.one_line import one_line_errors
from onegpu.errors import UsageError
from onegpu.plan import GB, Plan


def plan(
    model: Annotated[
        str,
        typer.Option(
            help="Preset (llama3-8b, llama3-70b, llama2-13b, gpt2, gpt2-xl, ...), or a config.json path or directory."
        ),
    ],
    global_batch_size: Annotated[int, typer.Option(help="Samples per optimizer step, over all devices.")],
    seq_len: Annotated[int, typer.Option(help="Tokens per sample.")],
    cluster: Annotated[
        str,
        typer.Option(
            help="Preset (a100-40gb, a100-80gb, h100-80gb, h100-96gb-500w, h200, mi250x, mi300x, local) or a YAML file."
        ),
    ],
    nodes: Annotated[int | None, typer.Option(help="Override the cluster's node count.")] = None,
    devices_per_node: Annotated[int | None, typer.Option(help="Override the devices per node.")] = None,
    memory_fraction: Annotated[float, typer.Option(help="Share of device memory a plan may use.")] = 0.9,
    dp: Annotated[int | None, typer.Option(help="Pin the data-parallel degree.")] = None,
    tp: Annotated[int | None, typer.Option(help="Pin the tensor-parallel degree.")] = None,
    pp: Annotated[int | None, typer.Option(help="Pin the pipeline stages.")] = None,
    microbatches: Annotated[int | None, typer.Option(help="Pin micro-batches per step.")] = None,
    schedule: Annotated[
        str | None, typer.Option(help="Pin the pipeline schedule: gpipe, 1f1b, interleaved, zero-bubble.")
    ] = None,
    sharding: Annotated[
        str | None, typer.Option(help="Pin sharding: none, optimizer, gradients, parameters, hybrid.")
    ] = None,
    activation_checkpointing: Annotated[
        str | None,
        typer.Option(
            help="Pin checkpointing: none, selective (recompute cheap operators, keep matmul and attention "
            "outputs), full, or a number of blocks."
        ),
    ] = None,
    offload: Annotated[str | None, typer.Option(help="Pin offload: none, optimizer, parameters.")] = None,
    mixed_precision: Annotated[str | None, typer.Option(help="Pin precision: bf16, fp16 or off.")] = None,
    compile_blocks: Annotated[
        str | None,
        typer.Option("--compile", help="Pin torch.compile of every repeated block: true or false (default: false)."),
    ] = None,
    inference: Annotated[
        bool,
        typer.Option(
            help="The plan prepare(model) without an optimizer chooses: replicas when the weights, one forward "
            "and the KV cache of a batch of --global-batch-size rows of --seq-len tokens fit a device, else tensor "
            "parallelism, else a pipeline; --mixed-precision bf16 or fp16: the weights' dtype."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Also draw memory per device and step time, by component, of the plan and its runners-up "
            "to this file (.png or .svg).",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Choose the fastest plan that fits a cluster, with no devices needed, and explain it."""
    from onegpu.planner.cluster import load_cluster  # the planner (and torch) only when planning
    from onegpu.planner.search import find_plan
    from onegpu.report.charts import writable

    if plot is not None:
        _usage(writable, plot)  # before planning: a wrong suffix costs nothing and writes nothing
    devices = load_cluster(cluster, nodes=nodes, devices_per_node=devices_per_node)
    if inference:
        weights = mixed_precision if mixed_precision in ("bf16", "fp16") else "fp32"
        _inference(model, devices, rows=global_batch_size, seq_len=seq_len, fraction=memory_fraction,
                   precision=weights, as_json=as_json)  # fmt: skip
        return
    chosen = find_plan(
        model,
        global_batch_size=global_batch_size,
        seq_len=seq_len,
        cluster=devices,
        budget_fraction=memory_fraction,
        dp=dp,
        tp=tp,
        pp=pp,
        microbatches=microbatches,
        schedule=schedule,
        sharding=sharding,
        activation_checkpointing=activation_checkpointing,
        offload=offload,
        mixed_precision=mixed_precision,
        compile=compile_blocks,
    )
    if as_json:
        typer.echo(json.dumps(chosen.to_dict(), indent=2))
    else:
        show(chosen, model=model, cluster=cluster)
    if plot is not None:
        from onegpu.report.plan_plot import plot_plan

        title = (
            f"{model} on {devices.nodes} × {devices.devices_per_node} {cluster}, batch {global_batch_size} × {seq_len}"
        )
        written = plot_plan(chosen, plot, budget_bytes=devices.memory_bytes * memory_fraction, title=title)
        typer.echo(f"plot: {written}", err=as_json)  # --json keeps stdout for the JSON


def _inference(model: str, devices, *, rows: int, seq_len: int, fraction: float, precision: str, as_json: bool):
    """The inference rule's plan for ``model`` (its weights in ``precision``) on ``devices``, and why."""
    from onegpu.planner.analysis import describe_model
    from onegpu.planner.inference import InferenceWork, choose_inference_plan, profile_cache_bytes_per_token
    from onegpu.planner.workload import is_cpu

    description = describe_model(model, seq_len=seq_len, precision=precision)
    world = devices.nodes * devices.devices_per_node
    work = InferenceWork(
        profile=description.profile,
        rows=rows,
        context=seq_len,
        tp_degrees=tuple(description.tensor_parallel_degrees(list(range(1, devices.devices_per_node + 1)))),
        cache_bytes_per_token=profile_cache_bytes_per_token(description.profile),
    )
    budget = int(devices.memory_bytes * fraction)
    chosen = choose_inference_plan(work=work, budget_bytes=budget, world_size=world, cpu=is_cpu(devices))
    if as_json:
        typer.echo(json.dumps(chosen.to_dict(), indent=2))
    else:
        typer.echo(f"Plan: {chosen.describe()}\n  {chosen.reason}")


def _usage(check: Callable[..., object], *args: object) -> None:
    """``check(*args)``, its UsageError shown as the one line of a wrong argument (exit code 2)."""
    try:
        check(*args)
    except UsageError as error:
        typer.echo(f"onegpu: {error}", err=True)
        raise typer.Exit(2) from None


def show(chosen: Plan, *, model: str, cluster: str) -> None:
    console = Console()
    if not console.is_terminal:  # a pipe or a file: do not wrap the table at 80 columns
        console = Console(width=160)
    p, s = chosen.predicted, chosen.search
    console.print(
        f"[bold]{model}[/] on [bold]{cluster}[/]: {s.candidates} candidates considered, {s.feasible} fit, "
        f"searched in {s.seconds:.2f} s"
    )
    console.print(f"[bold green]Plan:[/] {chosen.describe()}")
    console.print(
        f"  step {p.step_time_s:.3f} s | {p.tokens_per_s:,.0f} tokens/s | {p.tflops_per_device:.1f} TFLOP/s "
        f"per device | MFU {p.mfu:.1%} | {p.memory_per_device_bytes / GB:.1f} GB per device"
    )
    console.print("  memory: " + ", ".join(f"{k} {v / GB:.1f} GB" for k, v in p.memory_breakdown.items() if v))
    console.print("  time:   " + ", ".join(f"{k} {v:.3f} s" for k, v in p.time_breakdown.items() if v > 0))
    for note in chosen.confidence:
        console.print(f"  [yellow]unmeasured:[/] {note}", highlight=False)
    table = Table(title="Next best, and why the others lost")
    for column in ("plan", "step (s)", "tokens/s", "GB/device", "verdict"):
        table.add_column(column)
    for alt in chosen.alternatives:
        a = alt.predicted
        table.add_row(
            alt.describe(),
            f"{a.step_time_s:.3f}",
            f"{a.tokens_per_s:,.0f}",
            f"{a.memory_per_device_bytes / GB:.1f}",
            f"{a.step_time_s / p.step_time_s - 1:.0%} slower",
        )
    for rejection in chosen.rejected:
        r = rejection.plan.predicted
        table.add_row(
            rejection.plan.describe(),
            f"{r.step_time_s:.3f}",
            f"{r.tokens_per_s:,.0f}",
            f"{r.memory_per_device_bytes / GB:.1f}",
            rejection.why,
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("plan")(one_line_errors(plan))
