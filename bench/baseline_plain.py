"""Hand-written single-process baseline: plain PyTorch training of a benchmark model (bench/models.py).

    python bench/baseline_plain.py [--model demo|llama17m] [--steps 30] [--warmup 5] [--threads N]

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.models import MODELS  # noqa: E402
from bench.timing import profiled  # noqa: E402
from examples.demo_data import LR  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--steps", type=int, default=30, help="total optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="leading steps not timed")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error("need 0 <= --warmup < --steps")

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    bench = MODELS[args.model]
    loader = bench.loader(seed=args.seed)
    model = bench.build(seed=args.seed).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def batches():
        while True:  # restart the loader at each epoch boundary
            yield from loader

    def step() -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    stream = batches()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    with profiled("plain"):
        for _ in range(args.steps - args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu

    timed = args.steps - args.warmup
    print(
        json.dumps(
            {
                "name": "plain",
                "workers": 1,
                "tokens_per_s": timed * bench.tokens_per_step / elapsed,
                "step_time_s": elapsed / timed,
                "cpu_s_per_step": cpu / timed,
            }
        )
    )


if __name__ == "__main__":
    main()
