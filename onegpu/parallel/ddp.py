"""Data parallelism: every worker holds the whole model; gradients are averaged."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate import replicate


def apply_ddp(model: nn.Module, *, device: torch.device) -> nn.Module:
    """Replicate ``model`` in place (the user's class and attributes stay), gradients all-reduced by DDP."""
    return replicate(model, device_id=device)
