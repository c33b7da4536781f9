"""The timed training loop, the data and the planner's prediction the onegpu benchmarks share."""

from __future__ import annotations

import contextlib
import cProfile
import os
import time
from pathlib import Path

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


def predicted(plan, config, *, world_size: int, seq_len: int = SEQ_LEN, global_batch: int = GLOBAL_BATCH):
    """The planner's prediction for ``plan`` and a model of ``config`` on this machine, as this job's workers
    measure it (every worker calls this; the prediction comes back on rank 0, None elsewhere)."""
    from onegpu.planner.analysis import analyze
    from onegpu.planner.cluster import measure_job_cluster
    from onegpu.planner.cost_model import Workload, predict

    rank = dist.get_rank() if dist.is_initialized() else 0
    cluster = measure_job_cluster(rank=rank, world_size=world_size)  # a collective
    if rank != 0:
        return None
    profile = analyze(config, seq_len=seq_len, precision=plan.precision)
    return plan.predicted or predict(plan, Workload(profile=profile, global_batch=global_batch), cluster)


@contextlib.contextmanager
def profiled(name: str):
    """With BENCH_PROFILE=DIR, the timed steps under cProfile, saved per rank as DIR/<name>-rank<R>.prof (time per
    function per step: ``python -m pstats``); otherwise nothing."""
    folder = os.environ.get("BENCH_PROFILE")
    if not folder:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        Path(folder).mkdir(parents=True, exist_ok=True)
        profile.dump_stats(Path(folder) / f"{name}-rank{os.environ.get('RANK', '0')}.prof")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def time_steps(model, optimizer, loader, *, steps: int, warmup: int) -> tuple[float, list[float], float]:
    """Seconds per optimizer step after ``warmup`` untimed steps (the loader restarts when exhausted), the losses,
    and this process's CPU seconds per step (all its threads: on a busy machine a steadier figure than the wall's)."""

    def batches():
        while True:
            yield from loader

    def step() -> None:
        loss = model(**next(stream)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    stream, losses = batches(), []
    for _ in range(warmup):
        step()
    _barrier()
    start, cpu = time.perf_counter(), time.process_time()
    with profiled("onegpu"):
        for _ in range(steps - warmup):
            step()
        _barrier()
    timed = steps - warmup
    return (time.perf_counter() - start) / timed, losses, (time.process_time() - cpu) / timed
