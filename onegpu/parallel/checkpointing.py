"""Activation checkpointing: chosen blocks keep only their input and recompute the rest in backward."""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint

from onegpu.parallel.blocks import repeated_blocks


def apply_activation_checkpointing(model: nn.Module, *, blocks: int) -> int:
    """Checkpoint the first ``blocks`` repeated blocks in place; returns how many were checkpointed."""
    chosen = repeated_blocks(model)[:blocks]
    for block in chosen:
        checkpoint(block)
    return len(chosen)
