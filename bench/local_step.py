"""One measured configuration for bench/local_accuracy.py (launch with onegpu run).

    onegpu run --workers N bench/local_step.py --sharding none|gradients|parameters --checkpointing none|selective|full
        [--offload none|parameters] [--tp T] [--budget-gb G] [--steps 12] [--warmup 4] [--advanced]

Trains the demo model (or a larger one with --large) through onegpu with the given Plan (or the
planner's choice with --advanced), and prints one JSON line from rank 0 with the measured step time
and every worker's peak resident memory beside the planner's prediction for the same plan.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import onegpu
from onegpu.plan import Plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import demo_loader, predicted, time_steps  # noqa: E402
from examples.demo_data import LR, load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--sharding", default="none")
parser.add_argument("--checkpointing", default="none")
parser.add_argument("--offload", default="none")
parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (the rest of the workers: data parallel)")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--warmup", type=int, default=4)
parser.add_argument("--large", action="store_true", help="a 30M-parameter Llama instead of the 0.8M demo model")
parser.add_argument("--advanced", action="store_true", help="let the planner choose the plan")
parser.add_argument("--budget-gb", type=float, default=None)
args = parser.parse_args()

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

tokenizer = load_tokenizer()
size = (
    dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8)
    if args.large
    else dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4)
)
torch.manual_seed(0)
model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=len(tokenizer), num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **size
    )
)
optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
loader = demo_loader(tokenizer, max_bytes=2_000_000)
world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
if args.advanced:
    onegpu.enable_advanced_parallelization()
    model, optimizer, loader = onegpu.prepare(model, optimizer, loader, memory_budget_gb=args.budget_gb)
else:
    plan = Plan(
        dp=world // args.tp,
        tp=args.tp,
        sharding=args.sharding,
        activation_checkpointing=args.checkpointing,
        offload=args.offload,
    )
    model, optimizer, loader = onegpu.prepare(model, optimizer, loader, plan=plan)
plan = model.onegpu_plan

step_time, losses, _ = time_steps(model, optimizer, loader, steps=args.steps, warmup=args.warmup)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peaks = [peak]
if dist.is_initialized():
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)

prediction = predicted(plan, model.config, world_size=world)  # every worker takes part
if onegpu.is_main_process():
    print(
        json.dumps(
            {
                "plan": plan.describe(),
                "workers": world,
                "measured_step_s": step_time,
                "predicted_step_s": prediction.step_time_s,
                "measured_peak_bytes": max(peaks),
                "predicted_peak_bytes": prediction.memory_per_device_bytes,
                "losses": [losses[0], losses[-1]],
                "others": [f"{r.plan.describe()}: {r.why}" for r in plan.rejected],
                "breakdown": prediction.memory_breakdown,
            }
        )
    )
