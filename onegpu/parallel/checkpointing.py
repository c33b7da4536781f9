"""Activation checkpointing: chosen blocks keep only their input and recompute the rest in backward."""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint


def apply_activation_checkpointing(blocks: list[nn.Module]) -> int:
    """Checkpoint each of ``blocks`` in place; returns how many were checkpointed."""
    for block in blocks:
        checkpoint(block)
    return len(blocks)
