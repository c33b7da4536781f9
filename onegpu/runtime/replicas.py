"""``onegpu.split_between_replicas`` and ``onegpu.gather_object``: work on a list (prompts to complete, files to
score) spread over the model's replicas, the results back in the list's order.

A replica is one independent copy of the prepared model: under ``Plan(dp=N)`` each worker; under ``tp=2, dp=2``
each tensor-parallel pair (its two workers hold the same share and call the model together); under FSDP, ZeRO-2
or a pipeline the whole job (a forward gathers parameters from every worker, a pipeline's stages pass
activations), whose workers all hold the whole list and make the same calls. Before ``prepare``, every worker is
a replica.

    with onegpu.split_between_replicas(prompts) as mine:   # 7 prompts, 2 replicas: 4 and 3
        completions = [complete(model, p) for p in mine]
    completions = onegpu.gather_object(completions)        # all 7, in order, on every worker
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from onegpu.errors import UsageError
from onegpu.launch.process_group import Worker, current_worker
from onegpu.parallel.replicated import build_replicas_now
from onegpu.plan import Plan
from onegpu.runtime.own_share import own_calls
from onegpu.runtime.prepared import last_prepared

INDEPENDENT_SHARDING = ("none", "optimizer")  # every worker holds the whole model: a forward talks to no replica


@dataclass(frozen=True)
class Replicas:
    """The job's workers as independent model copies: this worker's replica ``index`` of ``count``, each
    ``size`` consecutive workers (the first of them speaks for it in ``gather_object``)."""

    index: int
    count: int
    size: int


def replicas_of(plan: Plan | None, *, worker: Worker) -> Replicas:
    """The replicas of a plan (None: nothing prepared, every worker one)."""
    if plan is None:
        return Replicas(index=worker.rank, count=worker.world_size, size=1)
    if plan.dp == 1 or plan.pp > 1 or plan.sharding not in INDEPENDENT_SHARDING:
        return Replicas(index=0, count=1, size=worker.world_size)
    return Replicas(index=worker.rank // plan.replica_size, count=plan.dp, size=plan.replica_size)


def share_bounds(length: int, *, index: int, count: int) -> tuple[int, int]:
    """[start, end) of replica ``index``'s share of ``length`` items: contiguous, the first ``length % count``
    replicas one more (7 on 2: 4 and 3; 1 on 2: 1 and none)."""
    base, extra = divmod(length, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@contextmanager
def split_between_replicas(items: Any) -> Iterator[Any]:
    """This replica's contiguous share of ``items`` (a list, tuple, tensor's rows, or a dict of them), as
    Accelerate's ``split_between_processes``; a share may be empty. Inside the block the model's calls are
    this replica's own: run as given, not sliced across replicas, so each replica makes the calls its share
    needs. In one process, or a job that is one replica (FSDP), the share is all of ``items``, which every
    worker computes whole."""
    prepared = last_prepared()
    replicas = _current_replicas()
    length = _length(items)
    if prepared is not None and replicas.count > length and "onegpu_deferred" in prepared.model.__dict__:
        raise UsageError(
            f"{length} items for {replicas.count} replicas leaves a replica without work before the model's first "
            f"call has built its plan (every worker takes part in it): call the model once first, or run fewer workers"
        )
    start, end = share_bounds(length, index=replicas.index, count=replicas.count)
    share = _take(items, start, end)
    if prepared is not None and replicas.count > 1:
        build_replicas_now(prepared.model)
    with own_calls():
        yield share


def gather_object(obj: Any) -> list[Any]:
    """Every replica's ``obj`` (any picklable object), in replica order, on every worker: lists are joined into
    one (so a split's results come back in the items' order), other objects give one entry per replica. Call
    it on every worker. In one process: ``obj`` itself if a list, else ``[obj]``."""
    replicas = _current_replicas()
    every = [obj]
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, obj)
        every = every[:: replicas.size]  # one worker per replica: a tensor-parallel pair's results once
    if all(isinstance(part, list) for part in every):
        return [item for part in every for item in part]
    return every


def _current_replicas() -> Replicas:
    prepared = last_prepared()
    if prepared is None:
        worker = current_worker()
        return replicas_of(None, worker=worker)
    return replicas_of(getattr(prepared.model, "onegpu_plan", None), worker=prepared.worker)


def _length(items: Any) -> int:
    if isinstance(items, dict):
        lengths = {key: _length(value) for key, value in items.items()}
        if len(set(lengths.values())) > 1:
            raise UsageError(f"split_between_replicas got a dict whose values differ in length ({lengths}): align them")
        return next(iter(lengths.values()), 0)
    if isinstance(items, (str, bytes)) or not hasattr(items, "__len__") or not hasattr(items, "__getitem__"):
        raise UsageError(
            f"split_between_replicas takes a list, tuple, tensor or a dict of them, not {type(items).__name__}: "
            f"pass a list (a str would be split into characters)"
        )
    return len(items)


def _take(items: Any, start: int, end: int) -> Any:
    if isinstance(items, dict):
        return {key: _take(value, start, end) for key, value in items.items()}
    return items[start:end]  # a list's, tuple's or tensor's rows
