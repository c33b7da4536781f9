"""The same training loop as bench/baseline_plain.py, run through onegpu (launch it with onegpu run).

    onegpu run --workers N bench/onegpu_train.py [--model demo|llama17m] [--steps 30] [--warmup 5]
        [--strategy ddp|fsdp] [--sharding S --precision P --compile --microbatches K] [--predict]

Without plan options onegpu chooses (or follows ``--strategy``); with any of them the job runs
``Plan(dp=N, sharding=S, precision=P, microbatches=K, compile=...)``. Rank 0 prints one JSON line like
the baselines, with every worker's peak resident memory (the largest) and, with ``--predict``, the
planner's prediction for the plan run; a plan the runtime refuses prints ``{"not_executable": why}``.
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
from onegpu.errors import UsageError
from onegpu.plan import Plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.models import MODELS  # noqa: E402
from bench.timing import predicted, time_steps  # noqa: E402
from examples.demo_data import LR  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--model", choices=sorted(MODELS), default="demo")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--warmup", type=int, default=5)
parser.add_argument("--strategy", choices=["ddp", "fsdp"], default=None)
parser.add_argument("--sharding", default=None, help="a Plan's sharding: none, gradients, parameters, ...")
parser.add_argument("--precision", default=None, help="a Plan's precision: fp32, bf16")
parser.add_argument("--compile", action="store_true", help="a Plan compiling each repeated block")
parser.add_argument("--microbatches", type=int, default=None, help="a Plan accumulating over K micro-batches")
parser.add_argument("--predict", action="store_true", help="add the planner's prediction for the plan run")
args = parser.parse_args()


def given_plan(world: int) -> Plan | None:
    """The Plan the options ask for (None: onegpu chooses)."""
    if args.sharding is None and args.precision is None and args.microbatches is None and not args.compile:
        return None
    fields = dict(
        dp=world,
        sharding=args.sharding or "none",
        precision=args.precision or "fp32",
        microbatches=args.microbatches or 1,
    )
    return Plan(**fields, **({"compile": True} if args.compile else {}))


bench = MODELS[args.model]
world = dist.get_world_size() if dist.is_initialized() else int(__import__("os").environ.get("WORLD_SIZE", "1"))
model = bench.build()
optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
try:
    plan = given_plan(world)
    model, optimizer, loader = onegpu.prepare(model, optimizer, bench.loader(), strategy=args.strategy, plan=plan)
except (TypeError, UsageError) as refused:  # a plan this runtime cannot run yet (TypeError: a Plan field it lacks)
    print(json.dumps({"not_executable": str(refused).splitlines()[0]}))
    sys.exit(0)
plan = model.onegpu_plan

step_time, losses, cpu_s = time_steps(model, optimizer, loader, steps=args.steps, warmup=args.warmup)
peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]
if dist.is_initialized():
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
prediction = (
    predicted(plan, model.config, world_size=world, seq_len=bench.seq_len, global_batch=bench.global_batch)
    if args.predict
    else None
)
result = {
    "name": f"onegpu-{plan.strategy}",
    "plan": plan.describe(),
    "workers": world,
    "tokens_per_s": bench.tokens_per_step / step_time,
    "step_time_s": step_time,
    "cpu_s_per_step": cpu_s,
    "peak_bytes": max(peaks),
    "losses": [losses[0], losses[-1]],
}
if prediction is not None:
    result |= {
        "predicted_tokens_per_s": prediction.tokens_per_s,
        "predicted_peak_bytes": prediction.memory_per_device_bytes,
    }
print(json.dumps(result))
