"""Per-worker memory of training a model: states counted exactly, activations measured on meta."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

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


def activation_bytes(model: nn.Module, sample: Any) -> int | None:
    """Bytes autograd saves for backward in one forward on ``sample``, measured on the meta device.

    Parameters are excluded (they are counted as states); nothing real is allocated.
    """
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
    state = {name: meta(t).requires_grad_(t.requires_grad) for name, t in model.named_parameters()}
    state.update({name: meta(t) for name, t in model.named_buffers()})
    param_storages = {t.untyped_storage()._cdata for t in state.values()}
    sample = _map_tensors(sample, meta)
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in param_storages:
            seen[storage._cdata] = max(seen.get(storage._cdata, 0), storage.nbytes())
        return tensor

    if isinstance(sample, dict):
        calls = [((), sample)]
    elif isinstance(sample, (list, tuple)):  # (inputs, targets): the model may take both, or the inputs only
        calls = [(tuple(sample), {}), ((sample[0],), {})]
    else:
        calls = [((sample,), {})]
    for args, kwargs in calls:
        seen.clear()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                functional_call(model, state, args, kwargs)
            return sum(seen.values())
        except Exception:  # data-dependent models cannot run on meta; the caller says so
            continue
    return None


def _map_tensors(value: Any, fn) -> Any:
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def estimate_memory(model: nn.Module, *, optimizer: torch.optim.Optimizer | None, sample: Any | None) -> MemoryEstimate:
    """What one worker needs when it holds the whole model (the DDP case)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return MemoryEstimate(
        parameters=params + sum(b.numel() * b.element_size() for b in model.buffers()),
        gradients=trainable,
        optimizer=trainable * optimizer_state_slots(optimizer),
        activations=None if sample is None else activation_bytes(model, sample),
    )
