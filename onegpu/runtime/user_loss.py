"""``prepare(..., loss_fn=...)``: a model that does not compute its loss computes the user's.

``model(inputs, target=y)`` then returns ``loss_fn(model(inputs), y)``; called without ``target``
the model returns its output as before. The result is a loss like a model's own: under data or
tensor parallelism onegpu makes it the global-batch loss, and under a pipeline the last stage
computes it for every micro-batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from onegpu.errors import UsageError

TARGET = "target"


def check_loss_fn(model: nn.Module, loss_fn: Callable) -> None:
    """A loss function of (output, target), for a model whose forward does not take ``target`` itself."""
    if not callable(loss_fn):
        raise UsageError(f"loss_fn must be a function of (output, target), not {type(loss_fn).__name__}")
    if TARGET in inspect.signature(model.forward).parameters:
        raise UsageError(
            f"{type(model).__name__}.forward takes its own {TARGET!r}: let the model compute its loss, and do not "
            "pass loss_fn to prepare()"
        )


def attach_loss_fn(model: nn.Module, loss_fn: Callable) -> None:
    """Make ``model(..., target=y)`` return ``loss_fn(output, y)``, before any other forward hook sees it."""
    pending: dict[str, Any] = {}

    def take_target(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        pending[TARGET] = kwargs.pop(TARGET, None)
        return args, kwargs

    def apply_loss(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        target = pending.pop(TARGET, None)
        return output if target is None else loss_fn(output, target)

    model.register_forward_pre_hook(take_target, with_kwargs=True, prepend=True)
    model.register_forward_hook(apply_loss, with_kwargs=True, prepend=True)
