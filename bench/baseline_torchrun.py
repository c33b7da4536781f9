"""Hand-written torchrun baselines: DistributedDataParallel, or FSDP2 (`fully_shard`) per decoder layer.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        bench/baseline_torchrun.py --strategy ddp|fsdp [--model demo|llama17m] [--steps 30] [--warmup 5]

The model's global batch (bench/models.py) is split evenly over the ranks. DDP keeps its default buckets
(25 MB); FSDP2 shards each decoder layer, then the root. Rank 0 prints one JSON line:
{"name": "torchrun-<strategy>", "workers": N, "tokens_per_s": ..., "step_time_s": ...}
where tokens_per_s counts the tokens of the whole global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.models import MODELS  # noqa: E402
from bench.timing import profiled  # noqa: E402
from examples.demo_data import LR  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--steps", type=int, default=30, help="total optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="leading steps not timed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error("need 0 <= --warmup < --steps")

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    bench = MODELS[args.model]
    if bench.global_batch % world:
        raise SystemExit(f"a global batch of {bench.global_batch} is not divisible by {world} ranks")

    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    dataset = bench.dataset()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = bench.loader(batch_size=bench.global_batch // world, sampler=sampler)
    # Same seed on every rank: identical weights (DDP also broadcasts rank 0's).
    model = bench.build(seed=args.seed).to(device)
    model.train()
    if args.strategy == "ddp":
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    else:
        for layer in model.model.layers:  # one all-gather / reduce-scatter unit per decoder layer
            fully_shard(layer)
        fully_shard(model)  # the root holds the embeddings, final norm and LM head
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def batches():
        epoch = 0
        while True:  # reshuffle at each epoch boundary
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    def step() -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
        loss = model(**batch).loss
        loss.backward()  # DDP all-reduces, FSDP reduce-scatters (averages) the gradients here
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    stream = batches()
    for _ in range(args.warmup):
        step()
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    with profiled(f"torchrun-{args.strategy}"):
        for _ in range(args.steps - args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu

    if rank == 0:
        timed = args.steps - args.warmup
        print(
            json.dumps(
                {
                    "name": f"torchrun-{args.strategy}",
                    "workers": world,
                    "tokens_per_s": timed * bench.tokens_per_step / elapsed,
                    "step_time_s": elapsed / timed,
                    "cpu_s_per_step": cpu / timed,
                }
            ),
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
