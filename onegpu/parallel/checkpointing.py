"""Activation checkpointing: chosen blocks keep only their input and recompute the rest in backward.

Recomputing a block runs its BatchNorm layers a second time; their running statistics are put back
afterwards, so that they count each batch once, as without checkpointing.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.nn.modules.batchnorm import _BatchNorm


def apply_activation_checkpointing(blocks: list[nn.Module]) -> int:
    """Checkpoint each of ``blocks`` in place; returns how many were checkpointed."""
    for block in blocks:
        checkpoint(block, context_fn=functools.partial(_contexts, block))
    return len(blocks)


def _contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """What the forward runs in (nothing more), and what its recomputation runs in."""
    return contextlib.nullcontext(), _running_statistics_kept(block)


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
