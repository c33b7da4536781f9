"""One job of bench/regret.py (launch it with onegpu run): list the planner's top plans, or time one of them.

    onegpu run --workers 2 bench/regret_step.py --model demo|llama17m|llama60m [--budget-gb G] --list [--trials K]
    onegpu run --workers 2 bench/regret_step.py --model M --plan '<Plan JSON>' [--steps 8] [--warmup 3]
    onegpu run --workers 2 bench/regret_step.py --model M --predict PLANS.json

``--list``: Advanced Parallelization plans the job (as ``prepare`` does, with ``memory_budget_gb``) and rank 0
prints one JSON line: the chosen plan and its alternatives, each with its prediction (with ``--trials K``, the
plan ``enable_advanced_parallelization(trials=K)`` measured fastest is the chosen one). ``--plan``: the job runs that
plan for ``warmup`` untimed steps, then ``steps`` steps each timed alone (a barrier on both sides) and prints their
times, this job's CPU seconds per step and every worker's peak resident memory (the largest). ``--predict``: the
planner's prediction today for each plan of a JSON list (every choice pinned, planned as ``prepare`` plans).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import onegpu
from onegpu.plan import Plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.models import MODELS  # noqa: E402
from examples.demo_data import LR  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--model", choices=sorted(MODELS), default="demo")
parser.add_argument("--budget-gb", type=float, default=None)
parser.add_argument("--list", action="store_true")
parser.add_argument("--trials", type=int, default=None, help="with --list: time the K best plans and keep the fastest")
parser.add_argument("--plan", default=None, help="a Plan as JSON (Plan.to_json)")
parser.add_argument("--predict", default=None, help="a file holding a JSON list of Plan JSON texts")
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--warmup", type=int, default=3)
args = parser.parse_args()

bench = MODELS[args.model]
model = bench.build()
optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
loader = bench.loader()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def pins(plan: Plan) -> dict:
    """Every choice of ``plan`` pinned: the search has exactly this plan left."""
    chosen = dict(dp=plan.dp, tp=plan.tp, pp=plan.pp, microbatches=plan.microbatches, sharding=plan.sharding,
                  activation_checkpointing=plan.activation_checkpointing, offload=plan.offload,
                  mixed_precision=plan.precision, compile=plan.compile)  # fmt: skip
    return chosen if plan.pp == 1 else {**chosen, "schedule": plan.schedule}


if args.predict:
    predictions = []
    for text in json.loads(Path(args.predict).read_text()):
        fresh = bench.build()
        onegpu.enable_advanced_parallelization(**pins(Plan.from_json(text)))
        fresh, _ = onegpu.prepare(fresh, torch.optim.AdamW(fresh.parameters(), lr=LR), bench.loader())[:2]
        predictions.append(fresh.onegpu_plan.predicted.to_dict())
    if onegpu.is_main_process():
        print(json.dumps({"predicted": predictions}))
    sys.exit(0)

if args.list:
    onegpu.enable_advanced_parallelization(trials=args.trials)
    model, optimizer, loader = onegpu.prepare(model, optimizer, loader, memory_budget_gb=args.budget_gb)
    chosen = model.onegpu_plan
    if onegpu.is_main_process():
        plans = [chosen, *chosen.alternatives]
        print(json.dumps({"plans": [{"plan": p.to_json(), "predicted": p.predicted.to_dict()} for p in plans]}))
    sys.exit(0)

model, optimizer, loader = onegpu.prepare(model, optimizer, loader, plan=Plan.from_json(args.plan))
stream = iter(loader)
times, cpu = [], []
for i in range(args.warmup + args.steps):
    batch = next(stream)
    _barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()
    _barrier()
    if i >= args.warmup:
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peaks = [peak]
if dist.is_initialized():
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
if onegpu.is_main_process():
    print(json.dumps({"step_s": times, "cpu_s": cpu, "peak_bytes": max(peaks), "plan": model.onegpu_plan.describe()}))
