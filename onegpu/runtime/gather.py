"""``onegpu.gather``: a value the loop computed on its slice of the batch, for the whole global batch.

Each data-parallel replica sees its slice of every global batch (3 workers, a batch of 7: rows 0-2,
3-4 and 5-6). ``gather`` concatenates a tensor's slices along dim 0 over the replicas, in the global
batch's order, on every worker (as Accelerate's ``gather_for_metrics``); the workers of one replica
(pipeline stages, tensor-parallel ranks) hold the same slice and are not repeated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from onegpu.batches import map_tensors

_replicas: dict[str, Any] = {"group": None}  # the data-parallel group of the plan executed last


def use_replica_group(group) -> None:
    """Set by ``execute``: the workers that read different slices of the batch (None: this one alone)."""
    _replicas["group"] = group


def gather(value: Any) -> Any:
    """Every tensor in ``value`` (a tensor, or dicts, tuples, lists of them) concatenated along dim 0 over the
    data-parallel replicas, in global batch order: the global batch's values, the same on every worker. A
    0-dim tensor becomes one row per replica. In a single process, ``value`` itself."""
    group = _replicas["group"]
    if group is None or not dist.is_initialized():
        return value
    return map_tensors(value, lambda tensor: _gathered(tensor, group))


def _gathered(tensor: torch.Tensor, group) -> torch.Tensor:
    rows = tensor.reshape(1, *tensor.shape) if tensor.dim() == 0 else tensor
    sent = rows.detach().to(torch.uint8) if rows.dtype == torch.bool else rows.detach()  # gloo has no bool
    count = dist.get_world_size(group)
    sizes = torch.tensor([len(sent)], device=sent.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(count)]
    dist.all_gather(all_sizes, sizes, group=group)
    longest = int(max(all_sizes))
    padded = sent.new_zeros((longest, *sent.shape[1:]))
    padded[: len(sent)] = sent
    parts = [torch.empty_like(padded) for _ in range(count)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    whole = torch.cat([part[: int(size)] for part, size in zip(parts, all_sizes)])
    return whole.to(rows.dtype)
