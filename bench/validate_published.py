"""The cost model against published large GPU training runs (bench/published_runs.yaml).

    python bench/validate_published.py

For each run: the model is analysed from its architecture (once per distinct model), the run's own
parallel layout is pinned (degrees, schedule, sharding, checkpointing, bf16) and costed as its
framework runs it (planner/frameworks.py: what it overlaps), and the predicted throughput is put
beside the measured one. Rows that use context parallelism (not modelled) are listed as skipped.
Then each published comparison of plans (same model, same cluster, or one scheme across scales) is
checked: does the cost model order the plans as they measured? Nothing here is fitted to these rows.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import yaml
from transformers import GPT2Config, LlamaConfig

from onegpu.errors import UsageError
from onegpu.plan import Plan
from onegpu.planner.analysis import analyze
from onegpu.planner.cluster import PRESETS, load_cluster
from onegpu.planner.cost_model import Workload, predict
from onegpu.planner.frameworks import FRAMEWORKS
from onegpu.planner.search import find_plan

SHARDING = {
    "none": "none",
    "zero1-distributed-optimizer": "optimizer",
    "zero3": "parameters",
    "fsdp-full-shard": "parameters",
    "fsdp-no-reshard-after-forward": "gradients",
}
# selective recomputation recomputes attention's cheap parts only (Korthikanti et al. 2022): costed as none
# until the planner has a "selective" checkpointing value
CHECKPOINTING = {"full": "full", "none": "none", "selective": "none", "selective-op": "selective"}
TARGET_MEDIAN, TARGET_WITHIN, TARGET_SHARE = 0.10, 0.20, 0.90

# Published comparisons of plans: (what, ids). Same model on the same cluster, ordered by measured tokens/s;
# or one scheme across cluster sizes at a fixed global batch, ordered by measured tokens/s per GPU.
COMPARISONS = (
    ("SC'21 175B, 384 GPUs: PTD-P vs ZeRO-3", ("megatron21-gpt3-175b-ptd-384gpu", "megatron21-gpt3-175b-zero3-384gpu")),
    ("SC'21 175B, 768 GPUs: PTD-P vs ZeRO-3", ("megatron21-gpt3-175b-ptd-768gpu", "megatron21-gpt3-175b-zero3-768gpu")),
    (
        "SC'21 175B, 1536 GPUs: PTD-P vs ZeRO-3",
        ("megatron21-gpt3-175b-ptd-1536gpu", "megatron21-gpt3-175b-zero3-1536gpu"),
    ),
    (
        "SC'21 530B, 1120 GPUs: PTD-P vs ZeRO-3",
        ("megatron21-gpt-530b-ptd-1120gpu", "megatron21-gpt-530b-zero3-1120gpu"),
    ),
    (
        "SC'21 530B, 2240 GPUs: PTD-P vs ZeRO-3",
        ("megatron21-gpt-530b-ptd-2240gpu", "megatron21-gpt-530b-zero3-2240gpu"),
    ),
    (
        "SC'21 175B ZeRO-3 per GPU, 384 / 768 / 1536 GPUs",
        (
            "megatron21-gpt3-175b-zero3-384gpu",
            "megatron21-gpt3-175b-zero3-768gpu",
            "megatron21-gpt3-175b-zero3-1536gpu",
        ),
    ),
    (
        "SC'21 175B PTD-P per GPU, 384 / 768 / 1536 GPUs",
        ("megatron21-gpt3-175b-ptd-384gpu", "megatron21-gpt3-175b-ptd-768gpu", "megatron21-gpt3-175b-ptd-1536gpu"),
    ),
    (
        "SC'21 530B PTD-P per GPU, 560 / 1120 / 2240 GPUs",
        ("megatron21-gpt-530b-ptd-560gpu", "megatron21-gpt-530b-ptd-1120gpu", "megatron21-gpt-530b-ptd-2240gpu"),
    ),
    (
        "Korthikanti 22B, 8 GPUs: selective+SP vs full recompute",
        ("korthikanti22-gpt-22b-8gpu", "korthikanti22-gpt-22b-8gpu-fullrecompute"),
    ),
    (
        "Korthikanti 175B, 64 GPUs: selective+SP vs full recompute",
        ("korthikanti22-gpt3-175b-64gpu-selective", "korthikanti22-gpt3-175b-64gpu-fullrecompute"),
    ),
)


@dataclass(frozen=True)
class Row:
    id: str
    measured: float  # tokens/s, whole job
    predicted: Plan
    fits: bool  # whether onegpu's memory model says the run's layout fits
    gpus: int

    @property
    def ratio(self) -> float:
        return self.predicted.predicted.tokens_per_s / self.measured


def load_runs() -> list[dict]:
    return yaml.safe_load(Path(__file__).with_name("published_runs.yaml").read_text())["runs"]


def model_config(m: dict):
    if m["family"] == "llama":
        return LlamaConfig(
            vocab_size=m["vocab"],
            hidden_size=m["hidden"],
            intermediate_size=m["ffn_hidden"],
            num_hidden_layers=m["layers"],
            num_attention_heads=m["heads"],
            num_key_value_heads=m["kv_heads"],
            max_position_embeddings=m["seq_len"],
        )
    return GPT2Config(
        vocab_size=m["vocab"],
        n_embd=m["hidden"],
        n_inner=m["ffn_hidden"],
        n_layer=m["layers"],
        n_head=m["heads"],
        n_positions=m["seq_len"],
    )


@cache
def _profile(model_items: tuple):
    m = dict(model_items)
    return analyze(model_config(m), seq_len=m["seq_len"], precision="bf16")


def profile_of(model: dict):
    """The model's profile, analysed once per distinct architecture and sequence length."""
    return _profile(tuple(sorted((k, v) for k, v in model.items() if k != "params_b")))


def measured_tokens_per_s(run: dict) -> float | None:
    """Published tokens/s; or derived from published model-FLOPs per GPU with onegpu's own FLOP count."""
    measured, par, model, hw = run["measured"], run["parallelism"], run["model"], run["hardware"]
    if measured.get("tokens_per_s"):
        return measured["tokens_per_s"]
    if measured.get("step_time_s"):
        return par["global_batch"] * model["seq_len"] / measured["step_time_s"]
    if measured.get("tflops_per_gpu") and hw["gpu"] in PRESETS:
        flops_per_token = profile_of(model).flops_per_sample / model["seq_len"]
        return measured["tflops_per_gpu"] * 1e12 * hw["nodes"] * hw["gpus_per_node"] / flops_per_token
    return None


def skip_reason(run: dict) -> str | None:
    if run["hardware"]["gpu"] not in PRESETS:
        return "GPU is not a preset"
    if run["parallelism"].get("cp", 1) > 1:
        return "context parallelism"
    if measured_tokens_per_s(run) is None:
        return "no tokens/s or step time published"
    return None


def _pins(par: dict) -> dict:
    pins = {
        "dp": par["dp"],
        "tp": par["tp"],
        "pp": par["pp"],
        "mixed_precision": "bf16",
        "offload": "none",
        "sharding": SHARDING[par["sharding"]],
    }
    if par["pp"] > 1:  # a framework's default pipeline schedule is 1F1B; interleaving is asked for
        pins["schedule"] = par.get("schedule") or "1f1b"
    if par.get("activation_checkpointing") in CHECKPOINTING:
        pins["activation_checkpointing"] = CHECKPOINTING[par["activation_checkpointing"]]
    if par.get("micro_batch"):
        pins["microbatches"] = par["global_batch"] // (par["dp"] * par["micro_batch"])
    return pins


def predicted(run: dict) -> tuple[Plan, bool]:
    """The run's own layout (what it leaves open chosen by the planner), costed as its framework runs it; and
    whether onegpu's memory model says it fits."""
    m, hw, par = run["model"], run["hardware"], run["parallelism"]
    cluster = load_cluster(hw["gpu"], nodes=hw["nodes"], devices_per_node=hw["gpus_per_node"])
    profile, pins = profile_of(m), _pins(par)
    try:
        plan = find_plan(profile, global_batch_size=par["global_batch"], seq_len=m["seq_len"], cluster=cluster, **pins)
        fits = True
    except UsageError:  # our conservative memory model rejects the run's layout: cost it anyway
        micro = par.get("micro_batch") or 1
        plan = Plan(
            dp=par["dp"],
            tp=par["tp"],
            pp=par["pp"],
            microbatches=par["global_batch"] // (par["dp"] * micro),
            schedule=pins.get("schedule", "none"),
            sharding=pins["sharding"],
            activation_checkpointing=pins.get("activation_checkpointing", "full"),
            precision="bf16",
        )
        fits = False
    work = Workload(
        profile=profile,
        global_batch=par["global_batch"],
        sequence_parallel=par.get("sequence_parallel") is not False,
        framework=FRAMEWORKS[run["framework"]],
    )
    return replace(plan, predicted=predict(plan, work, cluster)), fits


def validate(runs: list[dict]) -> tuple[list[Row], list[tuple[str, str]]]:
    rows, skipped = [], []
    for run in runs:
        reason = skip_reason(run)
        if reason:
            skipped.append((run["id"], reason))
            continue
        plan, fits = predicted(run)
        gpus = run["hardware"]["nodes"] * run["hardware"]["gpus_per_node"]
        rows.append(Row(run["id"], measured_tokens_per_s(run), plan, fits, gpus))
    return rows, skipped


def rankings(rows: list[Row], comparisons=COMPARISONS) -> list[tuple[str, list[str], list[str]]]:
    """Each comparison: its title, the ids in measured order and in predicted order (fastest per GPU first)."""
    by_id = {r.id: r for r in rows}
    out = []
    for title, ids in comparisons:
        group = [by_id[i] for i in ids if i in by_id]
        measured = sorted(group, key=lambda r: -r.measured / r.gpus)
        predicted_order = sorted(group, key=lambda r: -r.predicted.predicted.tokens_per_s / r.gpus)
        out.append((title, [r.id for r in measured], [r.id for r in predicted_order]))
    return out


def summary(rows: list[Row]) -> dict[str, float]:
    errors = [abs(r.ratio - 1) for r in rows]
    return {
        "rows": len(rows),
        "median": statistics.median(errors),
        "mean": statistics.mean(errors),
        "within": sum(e <= TARGET_WITHIN for e in errors) / len(errors),
    }


def main() -> None:
    rows, skipped = validate(load_runs())
    print(f"{'run':44} {'measured tok/s':>15} {'predicted':>12} {'pred/meas':>9} {'pred MFU':>8}  memory model")
    for r in rows:
        p = r.predicted.predicted
        fits = "fits" if r.fits else "says OOM"
        print(f"{r.id:44} {r.measured:15,.0f} {p.tokens_per_s:12,.0f} {r.ratio:9.2f} {p.mfu:8.1%}  {fits}")
    s = summary(rows)
    print(
        f"\n{s['rows']} runs: median |error| {s['median']:.0%} (target <= {TARGET_MEDIAN:.0%}), mean {s['mean']:.0%}, "
        f"within {TARGET_WITHIN:.0%}: {s['within']:.0%} (target >= {TARGET_SHARE:.0%})"
    )
    for rid, reason in skipped:
        print(f"skipped {rid}: {reason}")
    print("\nRanking: published comparisons of plans, fastest (per GPU) first")
    ranked = rankings(rows)
    for title, measured, predicted_order in ranked:
        verdict = (
            "same order" if measured == predicted_order else "DIFFERENT order: predicted " + " > ".join(predicted_order)
        )
        print(f"  {title}: measured {' > '.join(measured)}; {verdict}")
    print(f"{sum(m == p for _, m, p in ranked)}/{len(ranked)} comparisons ordered as measured")


if __name__ == "__main__":
    sys.exit(main())
