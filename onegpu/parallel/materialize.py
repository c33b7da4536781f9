"""Give real storage and initial values to a model built on the meta device."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def is_on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def materialize(model: nn.Module, *, device: torch.device) -> None:
    """Allocate (only this worker's shards, when sharded) and initialize a meta model in place.

    Hugging Face models are initialized by their own ``initialize_weights`` (which also
    recomputes buffers such as rotary frequencies); other modules by ``reset_parameters``.
    """
    model.to_empty(device=device)
    if hasattr(model, "initialize_weights") and hasattr(model, "config"):
        for module in model.modules():
            module.__dict__.pop("_is_hf_initialized", None)
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                tensor.__dict__.pop("_is_hf_initialized", None)
        with warnings.catch_warnings():  # DTensor random ops on CPU meshes warn; each shard is initialized locally
            warnings.filterwarnings("ignore", message="DTensor random operators")
            model.initialize_weights()
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
