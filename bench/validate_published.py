"""The cost model against published large GPU training runs (bench/published_runs.yaml).

    python bench/validate_published.py

For each run: the model is analysed from its architecture, the run's own parallel layout is
pinned (degrees, schedule, sharding, checkpointing, bf16), and the predicted throughput is put
beside the measured one. Rows whose GPU is not a cluster preset, or that use context
parallelism (not modelled), are listed as skipped. Nothing here is fitted to these rows.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import yaml
from transformers import GPT2Config, LlamaConfig

from onegpu.errors import UsageError
from onegpu.plan import Plan
from onegpu.planner.analysis import analyze
from onegpu.planner.cluster import load_cluster
from onegpu.planner.cost_model import Workload, predict
from onegpu.planner.search import find_plan

PRESETS = ("a100-40gb", "a100-80gb", "h100-80gb")
SHARDING = {
    "none": "none",
    "zero1-distributed-optimizer": "optimizer",
    "zero3": "parameters",
    "fsdp-full-shard": "parameters",
    "fsdp-no-reshard-after-forward": "gradients",
}
CHECKPOINTING = {"full": "full", "none": "none", "selective": "none", "selective-op": "none"}


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


def measured_tokens_per_s(run: dict) -> float | None:
    """Published tokens/s; or derived from published model-FLOPs per GPU with onegpu's own FLOP count."""
    measured, par, model, hw = run["measured"], run["parallelism"], run["model"], run["hardware"]
    if measured.get("tokens_per_s"):
        return measured["tokens_per_s"]
    if measured.get("step_time_s"):
        return par["global_batch"] * model["seq_len"] / measured["step_time_s"]
    if measured.get("tflops_per_gpu") and hw["gpu"] in PRESETS:
        flops_per_token = analyze(model_config(model), seq_len=model["seq_len"], precision="bf16").flops_per_sample
        flops_per_token /= model["seq_len"]
        return measured["tflops_per_gpu"] * 1e12 * hw["nodes"] * hw["gpus_per_node"] / flops_per_token
    return None


def predicted(run: dict) -> tuple[Plan, bool]:
    """The run's own layout, costed; and whether onegpu's memory model says it fits."""
    m, hw, par = run["model"], run["hardware"], run["parallelism"]
    cluster = load_cluster(hw["gpu"], nodes=hw["nodes"], devices_per_node=hw["gpus_per_node"])
    profile = analyze(model_config(m), seq_len=m["seq_len"], precision="bf16")
    pins = {
        "dp": par["dp"],
        "tp": par["tp"],
        "pp": par["pp"],
        "mixed_precision": "bf16",
        "offload": "none",
        "sharding": SHARDING[par["sharding"]],
    }
    if par["pp"] > 1 and par.get("schedule"):
        pins["schedule"] = par["schedule"]
    if par.get("activation_checkpointing") in CHECKPOINTING:
        pins["activation_checkpointing"] = CHECKPOINTING[par["activation_checkpointing"]]
    if par.get("micro_batch"):
        pins["microbatches"] = par["global_batch"] // (par["dp"] * par["micro_batch"])
    try:
        return find_plan(
            profile, global_batch_size=par["global_batch"], seq_len=m["seq_len"], cluster=cluster, **pins
        ), True
    except UsageError:  # our conservative memory model rejects the run's layout: cost it anyway
        micro = par.get("micro_batch") or 1
        layout = Plan(
            dp=par["dp"],
            tp=par["tp"],
            pp=par["pp"],
            microbatches=par["global_batch"] // (par["dp"] * micro),
            schedule=(pins.get("schedule") or "1f1b") if par["pp"] > 1 else "none",
            sharding=pins["sharding"],
            activation_checkpointing=pins.get("activation_checkpointing", "full"),
            precision="bf16",
        )
        work = Workload(profile=profile, global_batch=par["global_batch"])
        from dataclasses import replace

        return replace(layout, predicted=predict(layout, work, cluster)), False


def main() -> None:
    runs = yaml.safe_load(Path(__file__).with_name("published_runs.yaml").read_text())["runs"]
    errors, rows, skipped = [], [], []
    for run in runs:
        hw, par = run["hardware"], run["parallelism"]
        measured = measured_tokens_per_s(run)
        if hw["gpu"] not in PRESETS or par.get("cp", 1) > 1 or measured is None:
            reason = (
                "GPU is not a preset"
                if hw["gpu"] not in PRESETS
                else "context parallelism"
                if par.get("cp", 1) > 1
                else "no tokens/s or step time published"
            )
            skipped.append((run["id"], reason))
            continue
        chosen, fits = predicted(run)
        ratio = chosen.predicted.tokens_per_s / measured
        errors.append(abs(ratio - 1))
        rows.append((run["id"], measured, chosen.predicted.tokens_per_s, ratio, chosen.predicted.mfu, fits))
    print(f"{'run':42} {'measured tok/s':>15} {'predicted':>12} {'pred/meas':>9} {'pred MFU':>8}  memory model")
    for rid, meas, pred, ratio, mfu, fits in rows:
        print(f"{rid:42} {meas:15,.0f} {pred:12,.0f} {ratio:9.2f} {mfu:8.1%}  {'fits' if fits else 'says OOM'}")
    print(
        f"\n{len(rows)} runs: median |error| {statistics.median(errors):.0%}, mean |error| "
        f"{statistics.mean(errors):.0%}, within 25%: {sum(e <= 0.25 for e in errors)}/{len(errors)}"
    )
    for rid, reason in skipped:
        print(f"skipped {rid}: {reason}")


if __name__ == "__main__":
    sys.exit(main())
