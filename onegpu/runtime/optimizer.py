"""Keep an optimizer created before ``prepare`` pointed at the model's (possibly sharded) parameters; stop
the job at a step boundary when it is resized."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from onegpu.errors import UsageError
from onegpu.launch.process_group import Worker, running_backend
from onegpu.launch.resizing import accept_resize, mark_saves_state, requested_workers
from onegpu.runtime.call_slicing import random_state, set_random_state
from onegpu.runtime.data import at_next_batch
from onegpu.settings import settings


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The model name of every parameter in every group, failing loudly on a foreign one."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        found = []
        for param in group["params"]:
            if id(param) not in names:
                raise UsageError(
                    f"optimizer param group {index} holds a parameter of shape {tuple(param.shape)} that is "
                    f"not in the model: build the optimizer from model.parameters() of the model given to prepare()"
                )
            found.append(names[id(param)])
        groups.append(found)
    if optimizer.state:
        raise UsageError(
            "the optimizer has already taken steps (it holds state): call onegpu.prepare() before training, "
            "or load optimizer state after prepare()"
        )
    return groups


def repoint(optimizer: torch.optim.Optimizer, model: nn.Module, groups: list[list[str]]) -> None:
    """Replace each group's parameters by the model's current parameters of the same names.

    Names the model no longer holds (another pipeline stage's parameters) leave the optimizer.
    """
    current = dict(model.named_parameters())
    for group, names in zip(optimizer.param_groups, groups):
        group["params"] = [current[name] for name in names if name in current]


def stop_for_resize_at_step_boundary(model: nn.Module, optimizer: torch.optim.Optimizer, *, worker: Worker) -> None:
    """Under ``onegpu run``: when ``onegpu resize`` asked the job for another number of workers and the script
    saves its state, the workers agree after a step of ``optimizer`` to stop there, save the state at the next
    step boundary (when the loop asks a prepared loader for its next batch, or calls the model: after the rest
    of the step, its scheduler's step and logging) and end, for the launcher to start them again at the new
    size (``launch/resizing.py``). The state holds the random state of the step's end, before the loop drew
    anything for the next one. Per step: one file's stat and an all-reduce of one integer on the CPU, once
    the script saved or loaded its state."""
    status = settings().status_dir
    if status is None:
        return
    from onegpu.runtime.state import save_at_step_boundary, state_directory

    collective = dist.is_initialized() and worker.world_size > 1
    # the workers agree on the host, without waiting for an accelerator's stream (GPU: never run yet)
    group = dist.new_group(backend="gloo") if collective and running_backend(worker.device) != "gloo" else None
    marked, stopping = [], []

    def after_step(*_) -> None:
        directory = state_directory()
        if directory is None or stopping:
            return
        if not marked:
            if worker.is_main:
                mark_saves_state(status, state=directory)
            marked.append(True)
        wanted = requested_workers(status)
        target = torch.tensor([wanted if wanted is not None and wanted != worker.world_size else 0])
        if collective:  # a request seen at this step by one worker only counts for all of them
            dist.all_reduce(target, op=dist.ReduceOp.MAX, group=group)
        if target.item():
            stopping.append((int(target.item()), random_state(worker.device)))
            at_next_batch(stop)

    def stop(*_) -> None:
        if not stopping:
            return
        workers, random = stopping.pop()  # once: the other way of reaching the boundary then finds nothing to do
        set_random_state(random, worker.device)  # as the step ended: the process ends after saving
        save_at_step_boundary()
        if worker.is_main:
            accept_resize(status, workers=workers)
        raise SystemExit(0)  # every worker ends here; the launcher starts them again

    optimizer.register_step_post_hook(after_step)
    model.register_forward_pre_hook(stop, prepend=True)  # a loop without a prepared loader
