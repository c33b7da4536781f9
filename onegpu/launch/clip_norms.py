"""What the script's ``torch.nn.utils.clip_grad_norm_`` returned last, for the job's metrics
(``runtime/step_metrics.py``: the ``grad_norm`` of each step's row).

Rank 0 of a job of ``onegpu run`` records it from before the script starts (``launch/worker.py``), so that a script
that imported the function by name (``from torch.nn.utils import clip_grad_norm_``) calls the recording one too.
The function computes and clips exactly as torch's; it only keeps the total norm it returns (one reference, no
copy, no synchronisation).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

_LAST: list[Any] = [None]


def record_clipping() -> None:
    """From now on, ``torch.nn.utils.clip_grad_norm_`` also keeps what it returns (once per process)."""
    import torch.nn.utils as utils
    import torch.nn.utils.clip_grad as clip_grad

    original = clip_grad.clip_grad_norm_
    if getattr(original, "onegpu_records", False):
        return

    @functools.wraps(original)
    def clip_grad_norm_(*args: Any, **kwargs: Any) -> torch.Tensor:
        norm = original(*args, **kwargs)
        _LAST[0] = norm
        return norm

    clip_grad_norm_.onegpu_records = True
    utils.clip_grad_norm_ = clip_grad.clip_grad_norm_ = clip_grad_norm_


def take_norm() -> float | None:
    """The total norm clipped since the last call, or None when the script did not clip."""
    norm, _LAST[0] = _LAST[0], None
    if norm is None:
        return None
    full = getattr(norm, "full_tensor", None)  # a DTensor norm (sharded gradients) is replicated
    return float((full() if full is not None else norm).detach())
