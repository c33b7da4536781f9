"""What ``prepare`` was given and returned, kept for ``save_state`` and ``load_state``: the model, its optimizers
(and how many steps the first has taken), the loaders, the other objects with a state (LR schedulers), and the
random streams of the workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from onegpu.errors import UsageError
from onegpu.launch.process_group import Worker
from onegpu.runtime.call_slicing import random_state, set_random_state
from onegpu.runtime.data import GlobalBatchLoader


@dataclass
class Prepared:
    """The objects of the last ``prepare``, as the loop holds them."""

    worker: Worker
    model: nn.Module
    optimizers: tuple[torch.optim.Optimizer, ...]
    loaders: tuple[GlobalBatchLoader, ...]
    stateful: tuple[Any, ...]  # LR schedulers and any object with state_dict() and load_state_dict()
    optimizer_steps: list[int] = field(default_factory=lambda: [0])

    def call_slicer(self):
        """The model's random streams for calls sliced to a replica (None without data parallelism)."""
        pipeline = self.model.__dict__.get("onegpu_pipeline")
        return pipeline.slicer if pipeline is not None else self.model.__dict__.get("onegpu_call_slicer")

    def random_state(self) -> dict[str, Any]:
        """This worker's random state: torch's (CPU, device), Python's, NumPy's, and the model's call streams."""
        state = random_state(self.worker.device)
        slicer = self.call_slicer()
        if slicer is not None:
            state["calls"] = (slicer.seed, slicer.calls)
        return state

    def set_random_state(self, state: dict[str, Any]) -> None:
        set_random_state(state, self.worker.device)
        slicer = self.call_slicer()
        if slicer is not None and "calls" in state:
            slicer.seed, slicer.calls = state["calls"]


_prepared: Prepared | None = None


def remember(objects: list[Any], *, worker: Worker) -> None:
    """Keep the objects ``prepare`` returns (the last call's), and count the first optimizer's steps."""
    global _prepared
    models = [o for o in objects if isinstance(o, nn.Module)]
    optimizers = tuple(o for o in objects if isinstance(o, torch.optim.Optimizer))
    others = [o for o in objects if not isinstance(o, (nn.Module, torch.optim.Optimizer, GlobalBatchLoader))]
    prepared = Prepared(
        worker=worker,
        model=models[0],
        optimizers=optimizers,
        loaders=tuple(o for o in objects if isinstance(o, GlobalBatchLoader)),
        stateful=tuple(o for o in others if hasattr(o, "state_dict") and hasattr(o, "load_state_dict")),
    )
    if optimizers:
        optimizers[0].register_step_pre_hook(lambda *_: _count(prepared))
    _prepared = prepared


def _count(prepared: Prepared) -> None:
    prepared.optimizer_steps[0] += 1


def last_prepared() -> Prepared | None:
    """What the last ``prepare`` returned (None before any)."""
    return _prepared


def current(what: str) -> Prepared:
    if _prepared is None:
        raise UsageError(f"onegpu.{what} saves and restores what onegpu.prepare() was given: call prepare first")
    return _prepared
