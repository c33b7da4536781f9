"""Kernels as the planner measures them on the meta device: attention as the flash kernel, grouped matmuls
(mixture-of-experts) in any precision."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

META_FLASH = "onegpu_meta_attention"  # not "flash": HF would look for a kernel by that name


@functools.cache
def register_meta_flash() -> None:
    """A Hugging Face attention implementation that runs the flash kernel on meta tensors."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def meta_flash(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **_):
        groups = query.shape[1] // key.shape[1]
        if groups > 1:  # flash kernels read shared KV heads in place; repeating costs no memory on meta
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        if sliding_window and sliding_window < key.shape[2]:  # each query reads a window of keys
            key, value = key[:, :, -sliding_window:], value[:, :, -sliding_window:]
        if value.shape[-1] == query.shape[-1]:
            out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout, True, scale=scaling)
        else:  # values narrower than keys (multi-head latent attention): the memory-efficient kernel takes them
            out = torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, None, True, dropout, True, scale=scaling
            )
        return out[0].transpose(1, 2).contiguous(), None

    def causal_mask(*args: Any, **kwargs: Any) -> Any:
        """sdpa's mask without the padding, which the flash kernel does not read either: sdpa's asks whether a
        padding mask is all ones, and a meta tensor has no values (a call with an attention mask, generate's)."""
        return sdpa_mask(*args, **{**kwargs, "attention_mask": None})

    AttentionInterface.register(META_FLASH, meta_flash)
    AttentionMaskInterface.register(META_FLASH, causal_mask)


class GroupedMatmulsInBF16(TorchDispatchMode):
    """Grouped matmuls run on meta in bfloat16 only, as on CUDA: run the others in bfloat16 (the same
    FLOPs) and hand back the dtype asked for."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is not torch.ops.aten._grouped_mm or args[0].dtype == torch.bfloat16:
            return func(*args, **kwargs)

        def bf16(value):
            return value.to(torch.bfloat16) if torch.is_tensor(value) and value.is_floating_point() else value

        return func(*map(bf16, args), **{k: bf16(v) for k, v in kwargs.items()}).to(args[0].dtype)


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a grouped matmul: each row meets one group's matrix (torch's counter has no formula for it)."""
    if len(a_shape) == 2 and len(b_shape) == 2:  # (k, rows) @ (rows, n), rows split among the groups
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * a_shape[-1] * math.prod(out_shape)


FLOP_FORMULAS = {torch.ops.aten._grouped_mm: grouped_mm_flops}


def _configs(config: Any) -> Iterator[Any]:
    yield config
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            yield from _configs(sub)


def has_attention_choice(model: nn.Module) -> bool:
    """Whether a model takes its attention from its config (a Hugging Face model)."""
    return hasattr(getattr(model, "config", None), "_attn_implementation_internal")


@contextlib.contextmanager
def meta_attention(model: nn.Module) -> Iterator[None]:
    """While a Hugging Face model is inspected, its attention runs as the flash kernel (what autograd keeps is
    then what a real run keeps, not the sequence-squared attention matrix); other models are unchanged."""
    if not has_attention_choice(model):
        yield
        return
    config = model.config
    saved = [(c, c._attn_implementation_internal) for c in _configs(config)]
    register_meta_flash()
    config._attn_implementation = META_FLASH
    try:
        yield
    finally:
        for c, value in saved:
            c._attn_implementation_internal = value
