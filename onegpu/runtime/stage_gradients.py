"""A pipeline stage's gradients, whose norm is the norm over every stage.

``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` on a pipeline stage sees only that
stage's gradients. After each pipelined step onegpu marks them with a tensor subclass (for sharded or
tensor-parallel stages, a DTensor subclass): the norm of a marked gradient is marked too, a stack of
marked norms stays marked, and the norm of such a stack, the total norm ``clip_grad_norm_`` (or
``get_total_norm``) computes, is reduced over the stages of the pipeline. Only these gradients
behave so; nothing of torch is patched. A parameter several stages hold (tied embeddings) is counted
by the first of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

NORMS = {torch.linalg.vector_norm, torch.norm, torch.Tensor.norm, torch.linalg.norm}


@dataclass(frozen=True)
class Stages:
    """The pipeline a gradient belongs to, and whether this stage counts it in a norm."""

    group: Any
    counted: bool = True


def _marks(values: Any) -> list[Stages]:
    found = []
    for value in values if isinstance(values, (list, tuple)) else (values,):
        if isinstance(value, (list, tuple)):
            found.extend(_marks(value))
        else:
            mark = getattr(value, "_onegpu_stages", None)
            if mark is not None:
                found.append(mark)
    return found


def _handle(cls, func, args, kwargs):
    kwargs = kwargs or {}
    marks = _marks(args)
    with torch._C.DisableTorchFunctionSubclass():
        if func is torch.linalg.vector_norm and getattr(args[0], "_onegpu_counted", None) is not None:
            return _total(args[0], *args[1:], **kwargs)  # the norm of stacked norms: over every stage
        result = func(*args, **kwargs)
    if func in NORMS and marks:
        return _mark(result, marks[0], counted=[marks[0].counted])
    if func is torch._foreach_norm and marks:
        return [
            _mark(norm, mark, counted=[mark.counted]) if mark else norm
            for norm, mark in zip(result, (getattr(g, "_onegpu_stages", None) for g in args[0]))
        ]
    if func is torch.stack and marks:
        counted = [c for value in args[0] for c in getattr(value, "_onegpu_counted", [True])]  # norms, stacked
        return _mark(result, marks[0], counted=counted)
    if func is torch.Tensor.to and marks and hasattr(args[0], "_onegpu_counted"):
        return _mark(result, marks[0], counted=args[0]._onegpu_counted)
    return result


class StageGradient(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _handle(cls, func, args, kwargs)


class StageDTensorGradient(DTensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _handle(cls, func, args, kwargs)


def _mark(tensor: torch.Tensor, stages: Stages, *, counted: list[bool] | None) -> torch.Tensor:
    """``tensor`` marked as a stage's gradient (``counted`` None) or as norms of such (which of them count)."""
    if isinstance(tensor, DTensor):
        marked = StageDTensorGradient(tensor._local_tensor, tensor._spec, requires_grad=False)
    else:
        marked = tensor.as_subclass(StageGradient)
    marked._onegpu_stages = stages
    if counted is not None:
        marked._onegpu_counted = counted
    return marked


def mark_gradients(parameters: list[torch.nn.Parameter], *, group, counted_here) -> None:
    """Mark the gradients of a stage's ``parameters`` after a step; ``counted_here(p)``: whether this stage
    counts ``p`` in a norm."""
    for param in parameters:
        if param.grad is not None and not hasattr(param.grad, "_onegpu_stages"):
            param.grad = _mark(param.grad, Stages(group=group, counted=counted_here(param)), counted=None)


def _total(norms: torch.Tensor, ord: float = 2.0, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The p-norm over every stage of the stacked per-gradient norms of each."""
    stages, counted = norms._onegpu_stages, norms._onegpu_counted
    order = float(ord)
    mask = torch.tensor(counted, device=norms.device)
    local = norms.full_tensor() if isinstance(norms, DTensor) else norms  # sharded: over the replicas too
    local = local.as_subclass(torch.Tensor)[mask]
    if math.isinf(order):
        total = (local.max() if local.numel() else torch.zeros((), device=local.device)).double()
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=stages.group)
    else:
        total = (local.double() ** order).sum()
        dist.all_reduce(total, group=stages.group)
        total = total ** (1.0 / order)
    total = total.to(norms.dtype)
    if isinstance(norms, DTensor):  # sharded gradients are scaled by a replicated norm
        mesh = norms.device_mesh
        return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim)
    return total
