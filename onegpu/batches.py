"""Batches (and outputs) as trees of tensors (tensors, dicts and Hugging Face BatchEncodings, tuples, named tuples,
dataclasses, lists of rows or of columns): the one place that walks them."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from onegpu.errors import UsageError

CACHE_NAMES = ("cache", "past_key_values")  # a model's KV-cache input (transformers >= 5.2x: cache)


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, its containers kept."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, Mapping):
        return type(value)({k: map_tensors(v, fn) for k, v in value.items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f.name for f in dataclasses.fields(value) if f.init]
        return dataclasses.replace(value, **{name: map_tensors(getattr(value, name), fn) for name in fields})
    return value


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value``, in order."""
    found: list[torch.Tensor] = []
    map_tensors(value, found.append)
    return found


def move_to(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor on ``device``."""
    if hasattr(batch, "to") and isinstance(batch, Mapping):  # transformers BatchEncoding
        return batch.to(device)
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def to_meta(value: Any) -> Any:
    """The batch as meta tensors of the same shapes and dtypes (nothing allocated)."""
    return map_tensors(value, lambda t: torch.empty_like(t, device="meta"))


def holds_columns(batch: list) -> bool:
    """Whether a list is a batch's columns rather than its rows: torch's collation turns samples that are
    tuples or lists into a list of batched tensors, one per field."""
    return any(torch.is_tensor(v) or isinstance(v, Mapping) for v in batch)


def slice_batch(batch: Any, start: int, end: int) -> Any:
    """Rows [start, end) of every tensor or list of rows in a collated batch."""
    if torch.is_tensor(batch):
        return batch[start:end] if batch.dim() else batch
    if isinstance(batch, list) and not holds_columns(batch):
        return batch[start:end]
    if isinstance(batch, Mapping):
        return type(batch)({k: slice_batch(v, start, end) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(slice_batch(v, start, end) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, start, end) for v in batch)
    return batch


def leading_size(batch: Any) -> int:
    """Rows in a collated batch: the leading size of its first batched tensor, or the length of a list of rows."""
    if torch.is_tensor(batch) and batch.dim():
        return batch.shape[0]
    if isinstance(batch, list) and not holds_columns(batch):
        return len(batch)
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        if (torch.is_tensor(value) and value.dim()) or isinstance(value, (Mapping, list, tuple)):
            return leading_size(value)
    raise UsageError(
        "onegpu cannot find the batch dimension of this batch: give tensors, or dicts/tuples of them, whose first "
        "dimension is the batch"
    )


def first_sample(batch: Any) -> Any:
    """The first sample of a batch, still batched (a batch of one)."""
    return slice_batch(batch, 0, 1)


def sequence_length(batch: Any) -> int:
    """The tokens per sample of a batch of token ids (``input_ids``), 1 for other batches."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    return int(ids.shape[1]) if torch.is_tensor(ids) and ids.dim() > 1 else 1


def as_call(batch: Any) -> tuple[tuple, dict]:
    """How a batch is given to a model: a dict by keyword, a tuple or list by position, anything else alone."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (list, tuple)):
        return tuple(batch), {}
    return (batch,), {}


def as_keywords(forward: Callable, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's positional inputs named after the parameters of ``forward`` (a model's bound forward)."""
    if not args:
        return dict(kwargs)
    names = list(inspect.signature(forward).parameters)
    return {**dict(zip(names, args)), **kwargs}


def batch_size(args: tuple, kwargs: dict[str, Any]) -> int:
    """Samples in a forward's inputs: the leading size of its first batched tensor."""
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.dim() > 0:
            return value.shape[0]
    raise UsageError(
        "onegpu could not find a batched tensor among the model's inputs: pass tensors whose first dimension is the batch"
    )
