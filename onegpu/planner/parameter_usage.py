"""Which parts of a model use each parameter: a repeated block, or the end of the model (after the last
block: final norm, head, loss). Recorded during the inspection's forward pass.

A pipeline stage then holds the parameters its blocks use, and the last stage those the end uses.
Values made from parameters before the first block (the embedding's output, a skip connection's
projection) are followed until a block or the end consumes them; a block's own output starts
clean, because a later stage receives it from the previous one. So a tied embedding and head is used
by the first stage and the last; a skip connection's input projection by the first and the last.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from onegpu.planner.taint import Taint

START = -2  # what feeds the first block's hidden states (the embedding): the first stage only
END = -1  # the unit after the last block


class ParameterUsage(TorchDispatchMode):
    """Follows parameters (by name) through the code outside the blocks; records where they are consumed."""

    def __init__(self, blocks: list[nn.Module], parameters: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.blocks = blocks
        self.taint = Taint()
        self.unit: int | None = None  # the block running, END after the last, None before the first
        self.consumers: dict[str, set[int]] = {}
        self.handles: list[Any] = []
        self.active = True
        for name, tensor in parameters.items():
            self.taint.mark(tensor, frozenset({name}))

    def _consume(self, names: frozenset[str], unit: int) -> None:
        for name in names:
            self.consumers.setdefault(name, set()).add(unit)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active:
            names = self.taint.of((args, kwargs))
            if names and self.unit is None:  # before the first block: what is made from parameters flows on
                self.taint.mark(out, names)
            elif names:  # inside a block, or after the last one: consumed there
                self._consume(names, self.unit)
        return out

    def attach(self) -> None:
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._entering(index), with_kwargs=True, prepend=True))
            self.handles.append(block.register_forward_hook(self._leaving(END if index == last else None)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.active = False

    def _entering(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            others = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}) if args else (args, kwargs)
            self._consume(self.taint.of(others), index)  # masks, position embeddings: every block's own inputs
            if index == 0:
                self._consume(self.taint.of(hidden), START)  # later blocks receive theirs from the previous stage
            self.unit = index

        return hook

    def _leaving(self, unit: int | None):
        def hook(module, args, output):
            self.unit = unit

        return hook

    def used_by(self, name: str) -> frozenset[int]:
        return frozenset(self.consumers.get(name, ()))
