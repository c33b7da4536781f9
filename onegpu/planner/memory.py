"""Per-worker memory of training a whole model: states counted exactly, activations from its inspection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one worker needs to train the whole (unsharded) model on its slice of the batch."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int | None  # None when the forward could not be run on the meta device

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + (self.activations or 0)

    def describe(self) -> str:
        acts = "unknown" if self.activations is None else f"{self.activations / GIB:.2f}"
        return (
            f"params {self.parameters / GIB:.2f} + grads {self.gradients / GIB:.2f} + optimizer "
            f"{self.optimizer / GIB:.2f} + activations {acts} GiB"
        )


def optimizer_state_slots(optimizer: torch.optim.Optimizer | None) -> int:
    """How many parameter-sized tensors the optimizer keeps per parameter."""
    if optimizer is None:
        return 0
    name, defaults = type(optimizer).__name__, optimizer.defaults
    if name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam"):
        return 2 + int(bool(defaults.get("amsgrad")))
    if name == "SGD":
        return int(bool(defaults.get("momentum")))
    if name == "RMSprop":
        return 1 + int(bool(defaults.get("momentum"))) + int(bool(defaults.get("centered")))
    if name == "Adagrad":
        return 1
    return 2  # unknown optimizers: assume Adam-like


def estimate_memory(
    model: nn.Module, *, optimizer: torch.optim.Optimizer | None, activations: int | None
) -> MemoryEstimate:
    """What one worker needs when it holds the whole model (the DDP case); ``activations``: the bytes its slice's
    forward keeps for backward, from the model's inspection (None when it could not be inspected)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return MemoryEstimate(
        parameters=params + sum(b.numel() * b.element_size() for b in model.buffers()),
        gradients=trainable,
        optimizer=trainable * optimizer_state_slots(optimizer),
        activations=activations,
    )
