"""The timed training loop, the data and the planner's prediction the onegpu benchmarks share."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from examples.demo_data import GLOBAL_BATCH, SEQ_LEN, TextChunks


def demo_loader(tokenizer, *, max_bytes: int | None = None) -> DataLoader:
    """The demo corpus (its first ``max_bytes``) in shuffled global batches, the same order on every run."""
    return DataLoader(
        TextChunks(seq_len=SEQ_LEN, tokenizer=tokenizer, max_bytes=max_bytes),
        batch_size=GLOBAL_BATCH,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )


def predicted(plan, config, *, world_size: int):
    """The planner's prediction for ``plan`` and a model of ``config`` on this machine, as this job's workers
    measure it (every worker calls this; the prediction comes back on rank 0, None elsewhere)."""
    from onegpu.planner.analysis import analyze
    from onegpu.planner.cluster import measure_job_cluster
    from onegpu.planner.cost_model import Workload, predict

    rank = dist.get_rank() if dist.is_initialized() else 0
    cluster = measure_job_cluster(rank=rank, world_size=world_size)  # a collective
    if rank != 0:
        return None
    profile = analyze(config, seq_len=SEQ_LEN, precision="fp32")
    return plan.predicted or predict(plan, Workload(profile=profile, global_batch=GLOBAL_BATCH), cluster)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def time_steps(model, optimizer, loader, *, steps: int, warmup: int) -> tuple[float, list[float]]:
    """Seconds per optimizer step after ``warmup`` untimed steps (the loader restarts when exhausted), and the losses."""

    def batches():
        while True:
            yield from loader

    stream, losses = batches(), []
    start = time.perf_counter()
    for step in range(steps):
        if step == warmup:
            _barrier()
            start = time.perf_counter()
        loss = model(**next(stream)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    _barrier()
    return (time.perf_counter() - start) / (steps - warmup), losses
