"""The same training loop as bench/baseline_plain.py, run through onegpu (launch it with onegpu run).

    onegpu run --workers N bench/onegpu_train.py [--steps 30] [--warmup 5] [--strategy ddp|fsdp]

Rank 0 prints one JSON line like the baselines, with the name "onegpu-<strategy>".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import onegpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import demo_loader, time_steps  # noqa: E402
from examples.demo_data import GLOBAL_BATCH, LR, SEQ_LEN, build_demo_model, load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--warmup", type=int, default=5)
parser.add_argument("--strategy", choices=["ddp", "fsdp"], default=None)
args = parser.parse_args()

tokenizer = load_tokenizer()
loader = demo_loader(tokenizer)
model = build_demo_model(vocab_size=len(tokenizer))
optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
model, optimizer, loader = onegpu.prepare(model, optimizer, loader, strategy=args.strategy)


step_time, _ = time_steps(model, optimizer, loader, steps=args.steps, warmup=args.warmup)
world = dist.get_world_size() if dist.is_initialized() else 1
print(
    json.dumps(
        {
            "name": f"onegpu-{model.onegpu_plan.strategy}",
            "workers": world,
            "tokens_per_s": GLOBAL_BATCH * SEQ_LEN / step_time,
            "step_time_s": step_time,
        }
    )
)
