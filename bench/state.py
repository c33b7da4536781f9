"""Save and load time and size of ``onegpu.save_state`` (issue 15, acceptance 7); launch with onegpu run.

    onegpu run --workers 2 bench/state.py [--model demo|gpt2-125m] [--sharding none|parameters] [--dir DIR]

Builds the model (the demo Llama, or GPT-2's 124M-parameter configuration), takes one AdamW step so the
optimizer holds its state, then times on every worker (the slowest counts): a synchronous save_state, an
asynchronous one (the time the loop waits, and until it is committed), and a load_state into the same
objects. Prints one JSON line from rank 0, with the state's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import onegpu
from onegpu.plan import Plan
from onegpu.runtime.state import wait_for_save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="demo", choices=("demo", "gpt2-125m"))
parser.add_argument("--sharding", default="none", help="the plan's sharding (none: DDP)")
parser.add_argument("--dir", default=None, help="where to write the states (default: a temporary directory)")
args = parser.parse_args()


def build():
    torch.manual_seed(0)
    if args.model == "demo":
        from bench.models import MODELS

        return MODELS["demo"].build(), MODELS["demo"].config().vocab_size, 64
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config()), 50257, 64


def seconds(action) -> float:
    """The slowest worker's time for ``action``."""
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    action()
    elapsed = torch.tensor([time.perf_counter() - start])
    if dist.is_initialized():
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


model, vocab, seq = build()
tokens = torch.randint(0, vocab, (8, seq), generator=torch.Generator().manual_seed(0))
loader = DataLoader(TensorDataset(tokens), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
workers = int(os.environ.get("WORLD_SIZE", "1"))
model, optimizer, loader = onegpu.prepare(model, optimizer, loader, plan=Plan(dp=workers, sharding=args.sharding))
(batch,) = next(iter(loader))
model(input_ids=batch, labels=batch).loss.backward()
optimizer.step()
optimizer.zero_grad()

where = [args.dir or (tempfile.mkdtemp(prefix="onegpu-bench-state-") if onegpu.is_main_process() else None)]
if dist.is_initialized():
    dist.broadcast_object_list(where, src=0)  # one directory for every worker
root = Path(where[0])
save = seconds(lambda: onegpu.save_state(root, step=0))
size = sum(f.stat().st_size for f in (root / "step-00000000").iterdir())
returned = seconds(lambda: onegpu.save_state(root, step=1, asynchronous=True))
committed = returned + seconds(wait_for_save)
load = seconds(lambda: onegpu.load_state(root))
if onegpu.is_main_process():
    parameters = sum(p.numel() for p in model.parameters())  # a DTensor counts its global elements
    print(json.dumps({
        "model": args.model, "parameters_m": round(parameters / 1e6, 1), "workers": workers,
        "plan": model.onegpu_plan.describe(), "size_mb": round(size / 1e6, 1), "save_s": round(save, 2),
        "async_save_blocks_s": round(returned, 2), "async_save_committed_s": round(committed, 2),
        "load_s": round(load, 2),
    }), flush=True)  # fmt: skip
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
