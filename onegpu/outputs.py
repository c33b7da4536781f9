"""Where a model's output keeps its loss: the one finder and the one replacer, for every output shape.

The loss is a 0-dim floating tensor: the output itself; ``output["loss"]`` of a dict or any
``Mapping`` (Hugging Face ``ModelOutput`` included); ``output.loss`` of a dataclass or any object; in a
tuple or list, the first 0-dim floating tensor at any position (nanoGPT's ``(logits, loss)``, Hugging
Face's ``(loss, logits)``; a named tuple's ``loss`` field first). Replacing it keeps the output's type
and every other entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

LOSS = "loss"
Place = int | str | None  # a position in a sequence, "loss" (a key or attribute), None (the output itself)


def is_loss(value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() == 0 and value.is_floating_point()


def loss_place(output: Any) -> tuple[bool, Place]:
    """Whether ``output`` holds a loss, and where."""
    if torch.is_tensor(output):
        return is_loss(output), None
    if isinstance(output, tuple) and LOSS in getattr(output, "_fields", ()):  # a named tuple
        index = output._fields.index(LOSS)
        return is_loss(output[index]), index
    if isinstance(output, Mapping):
        return is_loss(output.get(LOSS)), LOSS
    if isinstance(output, (tuple, list)):
        index = next((i for i, value in enumerate(output) if is_loss(value)), None)
        return index is not None, index
    return is_loss(getattr(output, LOSS, None)), LOSS


def find_loss(output: Any) -> torch.Tensor | None:
    """The loss in a model's output, or None if it holds none."""
    found, place = loss_place(output)
    if not found:
        return None
    if place is None:
        return output
    if isinstance(place, int):
        return output[place]
    return output[LOSS] if isinstance(output, Mapping) else getattr(output, LOSS)


def replace_loss(output: Any, loss: torch.Tensor) -> Any:
    """``output`` (which holds a loss) with ``loss`` in its loss's place, its type and other entries kept."""
    _, place = loss_place(output)
    if place is None:
        return loss
    if isinstance(place, int):
        values = [loss if i == place else value for i, value in enumerate(output)]
        return type(output)(*values) if hasattr(output, "_fields") else type(output)(values)
    if isinstance(output, MutableMapping):  # dicts, ModelOutput: the object the model returned
        output[LOSS] = loss
        return output
    if isinstance(output, Mapping):
        return type(output)({**output, LOSS: loss})
    if dataclasses.is_dataclass(output) and output.__dataclass_params__.frozen:
        return dataclasses.replace(output, **{LOSS: loss})
    setattr(output, LOSS, loss)
    return output
