"""The few collectives onegpu itself needs, on top of the job's process group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from onegpu.launch.process_group import Worker


def all_reduce_sum(values: list[float], *, worker: Worker, group=None) -> list[float]:
    """Sum a few numbers over all workers, or ``group`` (float64, so token counts stay exact)."""
    if worker.world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=worker.device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def broadcast_from_main(tensors: list[torch.Tensor], *, worker: Worker) -> None:
    """Overwrite ``tensors`` on every worker with rank 0's values, in place."""
    if worker.world_size == 1:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)
