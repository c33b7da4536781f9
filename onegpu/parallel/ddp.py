"""Data parallelism: every worker holds the whole model; gradients are averaged."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate import replicate

from onegpu.errors import UsageError


def apply_ddp(model: nn.Module, *, device: torch.device) -> nn.Module:
    """Replicate ``model`` in place (the user's class and attributes stay), gradients all-reduced by DDP.

    A model with nothing to train (frozen, or without parameters) is only replicated: it has no gradient
    to average, and a parameter unfrozen later is refused at the next forward rather than trained apart.
    """
    if any(p.requires_grad for p in model.parameters()):
        return replicate(model, device_id=device)
    model.register_forward_pre_hook(_refuse_unfrozen)
    return model


def _refuse_unfrozen(model: nn.Module, args) -> None:
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        raise UsageError(
            "a parameter was unfrozen after onegpu.prepare(): set requires_grad before calling prepare, "
            "so that its gradients are averaged across workers"
        )
