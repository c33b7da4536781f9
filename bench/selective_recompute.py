"""What selective and full activation recomputation cost and save on this machine, beside the cost model.

    python bench/selective_recompute.py [--repeats 4] [--batch 8] [--seq 128]

One process trains a 30M-parameter Llama (8 blocks of 512) three ways, interleaved so that the load of the
machine falls on all alike: no recomputation, selective (parallel/checkpointing.py), full. It prints the
fastest step of each and its time over the plain one, beside the cost model's prediction for the same
plans on this machine (its step time and its activation bytes). Peak memory is measured per process by
bench/local_step.py (``--checkpointing none|selective|full``).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from onegpu.parallel.checkpointing import apply_activation_checkpointing
from onegpu.plan import Plan
from onegpu.planner.analysis import analyze
from onegpu.planner.cluster import measure_job_cluster
from onegpu.planner.cost_model import Workload, predict

MODES = ("none", "selective", "full")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
    base = LlamaForCausalLM(config)
    models = {}
    for mode in MODES:
        models[mode] = copy.deepcopy(base)
        if mode != "none":
            apply_activation_checkpointing(list(models[mode].model.layers), selective=mode == "selective")
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, model in models.items():
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            seconds[mode].append(time.perf_counter() - start)
    cluster = measure_job_cluster(rank=0, world_size=1)
    work = Workload(profile=analyze(config, seq_len=args.seq), global_batch=args.batch, optimizer_slots=0)
    print(f"{'mode':10} {'measured s':>10} {'x plain':>8} {'predicted s':>11} {'x plain':>8} {'activations MB':>14}")
    plain, plain_predicted = min(seconds["none"]), None
    for mode in MODES:
        p = predict(Plan(dp=1, activation_checkpointing=mode), work, cluster)
        plain_predicted = plain_predicted or p.step_time_s - p.time_breakdown["optimizer"]
        step = p.step_time_s - p.time_breakdown["optimizer"]  # forward and backward only, as measured
        print(f"{mode:10} {min(seconds[mode]):10.3f} {min(seconds[mode]) / plain:8.3f} {step:11.3f} "
              f"{step / plain_predicted:8.3f} {p.memory_breakdown['activations'] / 1e6:14.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
