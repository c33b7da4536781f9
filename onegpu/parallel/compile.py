"""``torch.compile`` per repeated block, as torchtitan does: each block's forward compiled on its own.

Applied after tensor parallelism and activation checkpointing and before data parallelism. Only the
block's ``forward`` is replaced (an instance attribute): the module, its class, its parameter names and
its hooks stay as they were, so FSDP2's gathering and the checkpointing hooks run eagerly around the
compiled forward, and checkpoints and optimizers see the same names.

What dynamo does is pinned, so that a run compiles a bounded number of times:

- ``fullgraph=True`` where dynamo can capture the whole block; a block it cannot (a graph break:
  ``.item()``, a print) is compiled with breaks instead, with one warning.
- Shapes start static and become dynamic at their first change (dynamo's automatic dynamic shapes):
  a last smaller batch or another sequence length compiles once more, not once per shape.
- Blocks of one class share one graph. A Hugging Face model left with ``use_cache=True`` passes a KV
  cache whose state differs per layer, which costs one graph per block: the recompile limit is
  raised to the blocks' count (twice, for the dynamic recompile), so no block falls back to eager.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo
from torch import nn


def apply_compile(blocks: list[nn.Module]) -> int:
    """Compile each of ``blocks``' forward in place; returns how many were compiled."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 2 * len(blocks) + 2)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * len(blocks) + 8)
    for block in blocks:
        block.forward = CompiledForward(block.forward)
    return len(blocks)


class CompiledForward:
    """A block's forward compiled whole (``fullgraph``), or with graph breaks if dynamo cannot capture it whole."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        functools.update_wrapper(self, forward)  # its signature stays the block's (inspect follows __wrapped__)
        self.eager = forward
        self.compiled = torch.compile(forward, fullgraph=True)
        self.fullgraph = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.fullgraph:
            return self.compiled(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.Unsupported as error:  # raised while tracing, before anything ran
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            warnings.warn(
                f"onegpu: {type(getattr(self.eager, '__self__', self.eager)).__name__} cannot be compiled as one graph ({first}); "
                "compiling it with graph breaks",
                stacklevel=2,
            )
            self.compiled, self.fullgraph = torch.compile(self.eager), False
            return self.compiled(*args, **kwargs)
