"""Data loading cost per worker for a loop without a DataLoader (nanoGPT's ``get_batch``).

    onegpu run --workers N bench/data_loading.py [--batch 32] [--block 128] [--steps 20] [--warmup 3]
    python bench/data_loading.py ...    (one plain process: the reference)

Every worker draws the whole global batch (``get_batch``: random offsets into a token tensor, the same on
every worker) and its model computes only its slice of it. Prints one JSON line from rank 0: per step,
the seconds spent in ``get_batch`` and in the model step (forward, backward, optimizer), on every worker,
and the rows each worker drew and computed. Figures only: loading is not sliced, computing is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from own_batches import GPT, GPTConfig  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--block", type=int, default=128)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--warmup", type=int, default=3)
args = parser.parse_args()

world = int(os.environ.get("WORLD_SIZE", "1"))
config = GPTConfig(block_size=args.block, vocab_size=512, n_layer=4, n_head=4, n_embd=128)
tokens = torch.randint(0, config.vocab_size, (1_000_000,), generator=torch.Generator().manual_seed(0))


def get_batch():
    ix = torch.randint(len(tokens) - args.block - 1, (args.batch,))
    x = torch.stack([tokens[i : i + args.block] for i in ix])
    y = torch.stack([tokens[i + 1 : i + 1 + args.block] for i in ix])
    return x, y


torch.manual_seed(0)
model = GPT(config)
optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95))
if world > 1:
    import onegpu

    model, optimizer = onegpu.prepare(model, optimizer, strategy="ddp")
loading, computing = [], []
for step in range(args.warmup + args.steps):
    start = time.perf_counter()
    x, y = get_batch()
    loaded = time.perf_counter()
    logits, loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step >= args.warmup:
        loading.append(loaded - start)
        computing.append(time.perf_counter() - loaded)
mine = {
    "get_batch_s": sum(loading) / len(loading),
    "model_step_s": sum(computing) / len(computing),
    "rows_drawn": x.shape[0],
    "rows_computed": logits.shape[0],
}
if world > 1:
    import torch.distributed as dist

    every = [None] * world
    dist.all_gather_object(every, mine)
else:
    every = [mine]
if int(os.environ.get("RANK", "0")) == 0:
    print(json.dumps({"workers": world, "batch": args.batch, "block": args.block, "per_worker": every}))
