"""One timed configuration for bench/pipeline_bubble.py: the demo model, plain (1 worker) or as a 2-worker pipeline,
with the planner's predicted step time for the pipeline."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import onegpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import time_steps  # noqa: E402
from examples.demo_data import GLOBAL_BATCH, LR, SEQ_LEN, TextChunks, build_demo_model, load_tokenizer  # noqa: E402

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
loader = DataLoader(
    TextChunks(seq_len=SEQ_LEN, tokenizer=tokenizer, max_bytes=2_000_000),
    batch_size=GLOBAL_BATCH,
    shuffle=True,
    drop_last=True,
    generator=torch.Generator().manual_seed(0),
)
model = build_demo_model(vocab_size=len(tokenizer))
optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
world = int(os.environ.get("WORLD_SIZE", "1"))
plan = onegpu.Plan(dp=1, pp=world, microbatches=args.microbatches, schedule=args.schedule) if world > 1 else None
model, optimizer, loader = onegpu.prepare(model, optimizer, loader, plan=plan)
step_time, _ = time_steps(model, optimizer, loader, steps=args.steps, warmup=args.warmup)
predicted = None
if plan is not None:  # the planner's prediction for the same plan on this machine, as measured by this job
    import torch.distributed as dist

    from onegpu.planner.analysis import analyze
    from onegpu.planner.cluster import measure_job_cluster
    from onegpu.planner.cost_model import Workload, predict

    cluster = measure_job_cluster(rank=dist.get_rank(), world_size=world)
    profile = analyze(model.config, seq_len=SEQ_LEN, precision="fp32")
    predicted = predict(plan, Workload(profile=profile, global_batch=GLOBAL_BATCH), cluster).step_time_s
if onegpu.is_main_process():
    print(json.dumps({"step_s": step_time, "predicted_s": predicted}))
