"""One timed configuration for bench/pipeline_bubble.py: the demo model, plain (1 worker) or as a 2-worker pipeline,
with the planner's predicted step time for the pipeline."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import onegpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import demo_loader, predicted, time_steps  # noqa: E402
from examples.demo_data import LR, build_demo_model, load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--schedule", default="gpipe")
parser.add_argument("--microbatches", type=int, default=4)
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--threads", type=int, default=0, help="torch threads (default: onegpu's choice)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
tokenizer = load_tokenizer()
loader = demo_loader(tokenizer, max_bytes=2_000_000)
model = build_demo_model(vocab_size=len(tokenizer))
optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
world = int(os.environ.get("WORLD_SIZE", "1"))
plan = onegpu.Plan(dp=1, pp=world, microbatches=args.microbatches, schedule=args.schedule) if world > 1 else None
model, optimizer, loader = onegpu.prepare(model, optimizer, loader, plan=plan)
step_time, _, _ = time_steps(model, optimizer, loader, steps=args.steps, warmup=args.warmup)
# the planner's prediction for the same plan on this machine
prediction = predicted(plan, model.config, world_size=world) if plan is not None else None
if onegpu.is_main_process():
    print(json.dumps({"step_s": step_time, "predicted_s": prediction and prediction.step_time_s}))
