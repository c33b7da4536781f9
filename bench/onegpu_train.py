"""The same training loop as bench/baseline_plain.py, run through onegpu (launch it with onegpu run).

    onegpu run --workers N bench/onegpu_train.py [--steps 30] [--warmup 5] [--strategy ddp|fsdp]

Rank 0 prints one JSON line like the baselines, with the name "onegpu-<strategy>".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import onegpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.demo_data import GLOBAL_BATCH, LR, SEQ_LEN, TextChunks, build_demo_model, load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--warmup", type=int, default=5)
parser.add_argument("--strategy", choices=["ddp", "fsdp"], default=None)
args = parser.parse_args()

tokenizer = load_tokenizer()
loader = DataLoader(
    TextChunks(seq_len=SEQ_LEN, tokenizer=tokenizer),
    batch_size=GLOBAL_BATCH,
    shuffle=True,
    drop_last=True,
    generator=torch.Generator().manual_seed(0),
)
model = build_demo_model(vocab_size=len(tokenizer))
optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
model, optimizer, loader = onegpu.prepare(model, optimizer, loader, strategy=args.strategy)


def batches():
    while True:
        yield from loader


def barrier():
    if dist.is_initialized():
        dist.barrier()


stream = batches()
for step in range(args.steps):
    if step == args.warmup:
        barrier()
        start = time.perf_counter()
    loss = model(**next(stream)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
barrier()
elapsed = time.perf_counter() - start
timed = args.steps - args.warmup
world = dist.get_world_size() if dist.is_initialized() else 1
print(
    json.dumps(
        {
            "name": f"onegpu-{model.onegpu_plan.strategy}",
            "workers": world,
            "tokens_per_s": timed * GLOBAL_BATCH * SEQ_LEN / elapsed,
            "step_time_s": elapsed / timed,
        }
    )
)
