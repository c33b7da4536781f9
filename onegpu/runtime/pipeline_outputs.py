"""A pipeline's evaluation outputs, on every worker of the pipeline as on one device.

The last stage keeps each micro-batch's output (the model's own type: a ``ModelOutput``, a tuple, a
dict); they are joined into one output of this replica's rows in batch order, and broadcast over the
pipeline: first the structure with each tensor's shape and dtype, then the tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten


def joined(outputs: list[Any]) -> Any:
    """Micro-batches' outputs as one: tensors with a batch dimension concatenated along it, 0-dim tensors
    (a loss, replaced by the caller) averaged, anything else the first micro-batch's."""
    flat = [tree_flatten(output) for output in outputs]
    spec = flat[0][1]
    leaves = []
    for values in zip(*(leaves for leaves, _ in flat), strict=True):
        first = values[0]
        if not torch.is_tensor(first):
            leaves.append(first)
        elif first.dim() == 0:
            leaves.append(torch.stack(values).mean(0))
        else:
            leaves.append(torch.cat(values))
    return tree_unflatten(leaves, spec)


def broadcast_output(output: Any, *, src: int, group, device: torch.device) -> Any:
    """``output`` (given on global rank ``src``) on every worker of ``group``."""
    sender = dist.get_rank() == src
    if sender:
        leaves, spec = tree_flatten(output)
        layout = [("tensor", t.shape, t.dtype) if torch.is_tensor(t) else ("value", t) for t in leaves]
        message = [(spec, layout)]
    else:
        message = [None]
    dist.broadcast_object_list(message, src=src, group=group, device=device)
    spec, layout = message[0]
    received = []
    for index, entry in enumerate(layout):
        if entry[0] == "value":
            received.append(entry[1])
            continue
        tensor = leaves[index].contiguous() if sender else torch.empty(entry[1], dtype=entry[2], device=device)
        dist.broadcast(tensor, src=src, group=group)
        received.append(tensor)
    return tree_unflatten(received, spec)
