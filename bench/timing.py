"""The timed training loop the onegpu benchmarks share."""

from __future__ import annotations

import time

import torch.distributed as dist


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
