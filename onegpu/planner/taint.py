"""Which sources a tensor's value derives from, followed by tensor identity while a recording pass runs."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves


class Taint:
    """Sources (names) per tensor; the tensors are kept alive while recording, so that their ids stay unique."""

    def __init__(self) -> None:
        self.sources: dict[int, frozenset[str]] = {}
        self.alive: list[torch.Tensor] = []

    def mark(self, value: Any, sources: frozenset[str]) -> None:
        """Every tensor in ``value`` derives from ``sources``."""
        for t in tree_leaves(value):
            if isinstance(t, torch.Tensor):
                self.sources[id(t)] = sources
                self.alive.append(t)

    def of(self, value: Any) -> frozenset[str]:
        """The sources of every tensor in ``value``, together."""
        found: frozenset[str] = frozenset()
        for t in tree_leaves(value):
            if isinstance(t, torch.Tensor):
                found |= self.sources.get(id(t), frozenset())
        return found
