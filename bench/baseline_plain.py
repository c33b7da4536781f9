"""Hand-written single-process baseline: plain PyTorch training of the demo model.

    python bench/baseline_plain.py [--steps 30] [--warmup 5] [--threads N]

Prints one JSON line: {"name": "plain", "workers": 1, "tokens_per_s": ..., "step_time_s": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.demo_data import (  # noqa: E402
    GLOBAL_BATCH,
    LR,
    SEQ_LEN,
    TextChunks,
    build_demo_model,
    load_tokenizer,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="total optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="leading steps not timed")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error("need 0 <= --warmup < --steps")

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tokenizer = load_tokenizer()
    dataset = TextChunks(seq_len=SEQ_LEN, tokenizer=tokenizer)
    loader = DataLoader(
        dataset,
        batch_size=GLOBAL_BATCH,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model = build_demo_model(vocab_size=len(tokenizer), seed=args.seed).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def batches():
        while True:  # restart the loader at each epoch boundary
            yield from loader

    stream = batches()
    for step in range(args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    timed = args.steps - args.warmup
    print(
        json.dumps(
            {
                "name": "plain",
                "workers": 1,
                "tokens_per_s": timed * GLOBAL_BATCH * SEQ_LEN / elapsed,
                "step_time_s": elapsed / timed,
            }
        )
    )


if __name__ == "__main__":
    main()
