"""Which layers tensor parallelism splits, without importing torch.distributed: the planner asks too."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_linear", "output_features"]


def is_linear(module: nn.Module) -> bool:
    """A layer computing ``x @ W (+ b)``: ``nn.Linear``, or a transposed one like GPT-2's ``Conv1D``."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.Linear)
        or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def output_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.nf
