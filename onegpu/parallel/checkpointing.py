"""Activation checkpointing: chosen blocks keep only their input and recompute the rest in backward.

Under selective recomputation (Korthikanti et al. 2022; torchtitan's operator-level policy, on torch's
``create_selective_checkpoint_contexts``) every block also keeps the outputs of its matmuls, its attention
kernels and its tensor-parallel reductions, and recomputes only the cheap operators between them (norms,
activations, residual adds, rotary embeddings): a few percent of the step for most of the memory.

Recomputing a block runs its BatchNorm layers a second time; their running statistics are put back
afterwards, so that they count each batch once, as without checkpointing.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from onegpu.plan import Plan

_aten, _collectives = torch.ops.aten, torch.ops._c10d_functional
# what selective recomputation keeps: the outputs of operators that are expensive to run again (GEMMs,
# attention kernels, collectives); the planner's inspection measures the same set
KEPT_OPERATORS = frozenset(
    {
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten.baddbmm.default,
        _aten._grouped_mm.default,
        _aten.convolution.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
        _collectives.all_reduce.default,
        _collectives.reduce_scatter_tensor.default,
    }
)


def checkpoint_blocks(blocks: list[nn.Module], plan: Plan) -> int:
    """Checkpoint one stage's ``blocks`` as ``plan`` says: all selectively, or its first fully."""
    if plan.selective:
        return apply_activation_checkpointing(blocks, selective=True)
    return apply_activation_checkpointing(blocks[: plan.checkpointed_blocks(len(blocks))])


def apply_activation_checkpointing(blocks: list[nn.Module], *, selective: bool = False) -> int:
    """Checkpoint each of ``blocks`` in place, wholly or (``selective``) keeping the outputs of
    ``KEPT_OPERATORS``; returns how many were checkpointed."""
    for block in blocks:
        earlier_pre, earlier_post = list(block._forward_pre_hooks), list(block._forward_hooks)
        checkpoint(block, context_fn=functools.partial(_contexts, block, selective=selective))
        # the checkpointed region encloses the hooks set before (tensor parallelism's input and output layouts):
        # its recomputation runs them once, as its forward did
        for key in [k for k in block._forward_pre_hooks if k not in earlier_pre]:
            block._forward_pre_hooks.move_to_end(key, last=False)
        for key in [k for k in block._forward_hooks if k not in earlier_post]:
            block._forward_hooks.move_to_end(key)
        block.register_forward_pre_hook(_without_cache, with_kwargs=True, prepend=True)
    return len(blocks)


CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _without_cache(module: nn.Module, args: tuple, kwargs: dict):
    """A block that is recomputed must not write a key/value cache twice (Hugging Face's own checkpointing drops
    it too): its recomputation would attend to the keys twice and run other operators than its forward did."""
    if not (module.training and torch.is_grad_enabled()):
        return None
    positions = _positions(type(module))
    kept = tuple(None if positions.get(i) in CACHE_ARGUMENTS else a for i, a in enumerate(args))
    dropped = {k: None for k in CACHE_ARGUMENTS if kwargs.get(k) is not None}
    if kwargs.get("use_cache"):
        dropped["use_cache"] = False
    if not dropped and all(a is b for a, b in zip(kept, args)):
        return None
    return kept, {**kwargs, **dropped}


@functools.cache
def _positions(block_type: type) -> dict[int, str]:
    """The names of a block's positional parameters, by position."""
    try:
        parameters = list(inspect.signature(block_type.forward).parameters)[1:]  # without self
    except (TypeError, ValueError):
        return {}
    return dict(enumerate(parameters))


def _keep_expensive(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func in KEPT_OPERATORS else CheckpointPolicy.PREFER_RECOMPUTE


def _contexts(block: nn.Module, *, selective: bool):
    """What the forward runs in, and what its recomputation runs in."""
    forward, recompute = (
        create_selective_checkpoint_contexts(_keep_expensive)
        if selective
        else (contextlib.nullcontext(), contextlib.nullcontext())
    )
    return forward, _both(_running_statistics_kept(block), recompute)  # statistics saved outside the recomputation


@contextlib.contextmanager
def _both(first: contextlib.AbstractContextManager, second: contextlib.AbstractContextManager):
    with first, second:
        yield


@contextlib.contextmanager
def _running_statistics_kept(block: nn.Module):
    buffers = [b for m in block.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
