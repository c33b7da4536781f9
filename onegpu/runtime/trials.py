"""Timing a few training steps of candidate plans on the job's own workers, without touching the user's training.

``time_plans`` runs each plan on a copy of the model and its optimizers (``copy.deepcopy`` of both together, so
the copied optimizers hold the copied parameters), one plan at a time, on the first global batch of the
DataLoader (read from its dataset: no sampler or generator is advanced). A step is what a training loop does:
the model's forward (its loss, weighted to the global batch's), ``backward``, every optimizer's ``step`` and
``zero_grad``. After a few warm-up steps (first-call costs: compiling, the optimizer's state), each timed step
runs between two barriers; a plan's time is the median of its steps on the slowest worker. Every random
state the loop could see (torch's, Python's, NumPy's) is restored afterwards, and the copies are dropped:
the model, its optimizers and the loader are exactly as they were.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from onegpu.batches import as_call
from onegpu.errors import UsageError
from onegpu.launch.process_group import Worker
from onegpu.outputs import find_loss
from onegpu.plan import Plan
from onegpu.runtime.call_slicing import random_state, set_random_state
from onegpu.runtime.data import first_samples
from onegpu.runtime.execute import TrainingObjects, execute

WARMUP_STEPS = 2
TIMED_STEPS = 3


@dataclass(frozen=True)
class Trial:
    """A plan and the median seconds of its timed steps (the slowest worker's); inf, and why, when it failed."""

    plan: Plan
    seconds: float
    failure: str = ""


def time_plans(
    plans: list[Plan], given: TrainingObjects, *, worker: Worker, loss_fn=None, count_items=None
) -> list[Trial]:
    """Each of ``plans`` timed on a copy of ``given``'s model and optimizers (collective: every worker calls it)."""
    loader = given.loaders[0]
    batch = first_samples(loader, loader.batch_size)
    if batch is None:
        raise UsageError("trials time the first batch of a DataLoader with a batch_size over a map-style dataset")
    state = random_state(worker.device)
    try:
        return [_trial(plan, given, batch, worker=worker, loss_fn=loss_fn, count_items=count_items) for plan in plans]
    finally:
        set_random_state(state, worker.device)


def _trial(plan: Plan, given: TrainingObjects, batch: Any, *, worker: Worker, loss_fn, count_items) -> Trial:
    """``plan`` timed; a plan that fails (one the runtime cannot run here) fails on every worker alike: the same
    plan on the same batch, so each raises at the same point; the workers then agree it failed."""
    failure = ""
    try:
        seconds = _timed(plan, given, batch, worker=worker, loss_fn=loss_fn, count_items=count_items)
    except Exception as error:
        seconds = math.inf
        failure = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
    finally:
        torch._dynamo.reset()  # a compiled plan's graphs go with its copy: the next compiles within dynamo's limits
        gc.collect()
    slowest = torch.tensor([seconds], dtype=torch.float64, device=worker.device)
    if worker.world_size > 1:
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # every worker decides on the same figures
    if math.isinf(float(slowest)):
        return Trial(plan=plan, seconds=math.inf, failure=failure or "failed on another worker")
    return Trial(plan=plan, seconds=float(slowest))


def _timed(plan: Plan, given: TrainingObjects, batch: Any, *, worker: Worker, loss_fn, count_items) -> float:
    """Median seconds of ``plan``'s timed steps on a copy of the model and optimizers."""
    model, optimizers = copy.deepcopy((given.model, given.optimizers))
    copies = replace(given, objects=(model, *optimizers), model=model, optimizers=optimizers, loaders=())
    prepared = execute(plan, copies, worker=worker, loss_fn=loss_fn, count_items=count_items)[0]
    args, kwargs = as_call(batch)
    times = []
    for i in range(WARMUP_STEPS + TIMED_STEPS):
        _barrier(worker)
        start = time.perf_counter()
        loss = find_loss(prepared(*args, **kwargs))
        if loss is None:
            raise UsageError("trials need a model that returns its loss (or a loss_fn given to prepare())")
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the device
        _barrier(worker)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _barrier(worker: Worker) -> None:
    if worker.world_size > 1:
        dist.barrier()
