"""``onegpu.save_state`` and ``onegpu.load_state``: training saved whole and continued exactly, on any plan.

A state is everything ``prepare`` was given, as the loop holds it: the model and its optimizers (sharded with
torch.distributed.checkpoint, every worker writing its part, keyed by the model's own parameter names, so a
state saved under one plan loads under any other: :mod:`onegpu.parallel.state_dict`), LR schedulers and other
objects with a ``state_dict``, each loader's epoch and position in it, every worker's random state, the
step, the optimizer's step count and the user's extra values. See :mod:`onegpu.runtime.state_files` for
the files and the commit marker that makes a save atomic.

Resuming on another number of workers or another plan continues exactly (the data order is drawn on global
sample indices; the global batch is kept) except for random numbers drawn inside the model (dropout), whose
streams are per replica: resuming says so in one line.
"""

from __future__ import annotations

import atexit
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from onegpu.errors import UsageError
from onegpu.parallel.optimizer_state import refresh_pieces
from onegpu.parallel.state_dict import (
    MODEL,
    StateTensors,
    model_shapes,
    model_state,
    optimizer_state,
    optimizer_targets,
)
from onegpu.runtime import state_files as files
from onegpu.runtime.prepared import Prepared, current

_last: dict[str, Any] = {"directory": None, "options": {}, "extra": {}, "saved_extra": None}
_pending: list[Any] = []  # an asynchronous save not yet waited for: its future
_async_group: list[Any] = []


def state_directory() -> Path | None:
    """The directory this process last saved a state to or loaded one from (None if it did neither)."""
    return _last["directory"]


def saved_extra() -> dict[str, Any]:
    """The extra values of the state ``load_state`` restored (``save_state(dir, step=s, epoch=e)``: ``{"epoch": e}``)."""
    if _last["saved_extra"] is None:
        raise UsageError("onegpu.saved_extra() returns what load_state restored: call onegpu.load_state first")
    return dict(_last["saved_extra"])


def save_state(directory: str | Path, *, step: int, keep: int = 3, asynchronous: bool = False, **extra: Any) -> None:
    """Save everything ``prepare`` was given, the random states, ``step`` and ``extra`` values to
    ``directory/step-<step>/``; call it on every worker. The state counts once every worker has written its
    part (a crash mid-save leaves the previous state); the newest ``keep`` states are kept. ``asynchronous``:
    the tensors are copied and written while training goes on (committed when written; the next save, a load
    and the end of the process wait for it)."""
    prepared = current("save_state")
    wait_for_save()
    if keep < 1:
        raise UsageError(f"save_state(keep={keep}): keep at least the newest state (keep=1)")
    root = Path(directory)
    files.check_directory(root, create=True)
    _last.update(directory=root, options={"keep": keep, "asynchronous": asynchronous}, extra=extra)
    target = files.step_directory(root, step)
    worker = prepared.worker
    if (target / files.COMMITTED).exists():
        if worker.is_main:
            files.uncommit(target)
        _barrier(worker)
    target.mkdir(exist_ok=True)
    torch.save(prepared.random_state(), target / files.RANDOM.format(rank=worker.rank))
    if worker.is_main:
        torch.save(_summary(prepared, step=step, extra=extra), target / files.SUMMARY)
        _write_config(prepared, target)
    tensors = _tensors(prepared)
    commit = _committer(target, root, step=step, keep=keep, workers=worker.world_size, main=worker.is_main)
    if asynchronous:
        _save_async(tensors, target, commit=commit)
    else:
        _dcp().save(tensors, checkpoint_id=target, no_dist=not dist.is_initialized())
        commit()


def save_at_step_boundary() -> None:
    """Save to :func:`state_directory` as the loop's last ``save_state`` did, the step counted from the prepared
    optimizer's steps (``load_state`` then returns that count); on every worker, between optimizer steps."""
    directory = state_directory()
    if directory is None:
        raise UsageError(
            "this job saves no state (it never called onegpu.save_state or onegpu.load_state): "
            "save states in the training script to resize or restart it"
        )
    prepared = current("save_state")
    save_state(directory, step=prepared.optimizer_steps[0] - 1, **_last["options"], **_last["extra"])


def load_state(directory: str | Path) -> int | None:
    """Restore the newest committed state in ``directory`` into what ``prepare`` was given; returns the step
    to continue from (the saved step + 1), or None when there is none (a missing or empty directory).
    The values saved as ``extra`` are then :func:`saved_extra`'s. Call it on every worker."""
    prepared = current("load_state")
    wait_for_save()
    root = Path(directory)
    files.check_directory(root, create=False)
    _last["directory"] = root
    path = files.newest_state(root)
    _say_half_written(root, path, worker=prepared.worker)
    if path is None:
        return None
    summary = torch.load(path / files.SUMMARY, weights_only=False)
    _check_batches(prepared, summary, path)
    metadata = _dcp().FileSystemReader(path).read_metadata().state_dict_metadata
    _check_same_model(prepared, metadata, path)
    if "onegpu_deferred" in prepared.model.__dict__:  # split at its first call: its tensors are read then
        prepared.model.__dict__["onegpu_state_after_build"] = lambda: _load_tensors(prepared, path, summary, metadata)
    else:
        _load_tensors(prepared, path, summary, metadata)
    _restore(prepared, path, summary)
    _last["saved_extra"] = summary["extra"]
    return summary["step"] + 1


def load_after_build(model) -> None:
    """A model split at its first call reads the tensors of the state ``load_state`` found (called once split)."""
    load = model.__dict__.pop("onegpu_state_after_build", None)
    if load is not None:
        load()


def wait_for_save() -> None:
    """Wait until an asynchronous save has been written (and committed)."""
    while _pending:
        future = _pending.pop()
        future.result()


# --- saving -------------------------------------------------------------------------------------------


def _tensors(prepared: Prepared) -> dict[str, torch.Tensor]:
    state = model_state(prepared.model).tensors
    for index, optimizer in enumerate(prepared.optimizers):
        state.update(optimizer_state(prepared.model, optimizer, index=index).tensors)
    return state


def _summary(prepared: Prepared, *, step: int, extra: dict[str, Any]) -> dict[str, Any]:
    plan = getattr(prepared.model, "onegpu_plan", None)
    return {
        "step": step,
        "optimizer_steps": prepared.optimizer_steps[0],
        "workers": prepared.worker.world_size,
        "plan": plan.describe() if plan is not None else "one worker",
        "dp": plan.dp if plan is not None else prepared.worker.world_size,
        "groups": [[_hyper(g) for g in o.param_groups] for o in prepared.optimizers],
        "stateful": [o.state_dict() for o in prepared.stateful],
        "loaders": [
            loader.position.state(loader.order_generator(), batch_size=loader.batch_size_global())
            for loader in prepared.loaders
        ],  # fmt: skip
        "extra": extra,
    }


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _write_config(prepared: Prepared, target: Path) -> None:
    """A Hugging Face model's config beside its state, for ``onegpu export``."""
    config = getattr(prepared.model, "config", None)
    if config is None or not hasattr(config, "to_json_file"):
        return
    from onegpu.runtime.checkpoint import _fix_architectures, user_class

    config.to_json_file(target / "config.json")
    _fix_architectures(target / "config.json", user_class(prepared.model).__name__)


def _committer(target: Path, root: Path, *, step: int, keep: int, workers: int, main: bool):
    def commit() -> None:  # after torch's save returned on rank 0: every worker's part is written
        if main:
            files.commit(target, step=step, workers=workers)
            files.prune(root, keep=keep)

    return commit


def _save_async(tensors: dict[str, torch.Tensor], target: Path, *, commit) -> None:
    dcp = _dcp()
    group = None
    if dist.is_initialized():
        if not _async_group:  # its own group: the writing thread's collectives never meet the loop's
            _async_group.append(dist.new_group(backend="gloo"))
            atexit.register(wait_for_save)
        group = _async_group[0]
    elif not _async_group:
        _async_group.append(None)
        atexit.register(wait_for_save)
    written = dcp.async_save(tensors, checkpoint_id=target, process_group=group, no_dist=group is None)
    written = getattr(written, "upload_completion", written)
    from concurrent.futures import Future

    committed: Future = Future()

    def done(future) -> None:
        try:
            future.result()
            commit()
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits
            committed.set_exception(error)
        else:
            committed.set_result(None)

    written.add_done_callback(done)
    _pending.append(committed)


def _barrier(worker) -> None:
    if worker.world_size > 1:
        dist.barrier()


def _dcp():
    import torch.distributed.checkpoint as dcp  # a second to import: only when states are used

    # one process without a process group reads and writes alone, as it should: torch need not say so
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    return dcp


# --- loading ------------------------------------------------------------------------------------------


def _say_half_written(root: Path, path: Path | None, *, worker) -> None:
    half = files.half_written(root) if files.STEP.fullmatch(root.name) is None else []
    if half and worker.is_main:
        instead = f"loading {path.name} instead" if path is not None else "no earlier state: starting anew"
        names = ", ".join(p.name for p in half)
        print(f"onegpu: warning: {names} in {root} was not completely saved (no {files.COMMITTED} marker): {instead}",
              file=sys.stderr, flush=True)  # fmt: skip


def _check_batches(prepared: Prepared, summary: dict[str, Any], path: Path) -> None:
    saved = summary["loaders"]
    if len(saved) != len(prepared.loaders):
        raise UsageError(
            f"the state in {path} holds {len(saved)} DataLoader positions but prepare() was given "
            f"{len(prepared.loaders)} DataLoaders: prepare the same loaders as the run that saved it"
        )
    for index, (loader, position) in enumerate(zip(prepared.loaders, saved)):
        size = loader.batch_size_global()
        if position["batch_size"] != size:
            raise UsageError(
                f"the state in {path} was saved with a global batch of {position['batch_size']} samples, DataLoader "
                f"{index} has {size}: keep the batch size to resume (it is the global batch, whatever the workers)"
            )


def _check_same_model(prepared: Prepared, metadata: dict[str, Any], path: Path) -> None:
    """Refuse a state of another model, naming the first parameter that differs."""
    model = prepared.model
    mine = model_shapes(model)
    problem = None
    for key, shape in mine.items():
        saved = metadata.get(key)
        if saved is None or not hasattr(saved, "size"):
            problem = f"its parameter {key[len(MODEL) :]!r} is not in the state"
        elif tuple(saved.size) != tuple(shape):
            problem = f"its parameter {key[len(MODEL) :]!r} has shape {tuple(shape)}, the state's {tuple(saved.size)}"
        if problem:
            break
    whole = "onegpu_pipeline" not in model.__dict__  # a pipeline stage holds some of the names only
    extra = [k for k in metadata if k.startswith(MODEL) and k not in mine] if whole and problem is None else []
    if extra:
        problem = f"the state's parameter {extra[0][len(MODEL) :]!r} is not in it"
    if problem:
        raise UsageError(
            f"the state in {path} was saved from another model: this {_class_name(model)}: {problem} "
            "(load a state of this model, or save to another directory)"
        )


def _class_name(model) -> str:
    """The model's class as the user wrote it (not the one FSDP2, DDP or a pipeline put in front of it)."""
    wrappers = ("onegpu", "torch.distributed")
    return next(c.__name__ for c in type(model).__mro__ if not c.__module__.startswith(wrappers))


def _load_tensors(prepared: Prepared, path: Path, summary: dict[str, Any], metadata: dict[str, Any]) -> None:
    model = prepared.model
    saved = {k: (torch.Size(m.size), m.properties.dtype) for k, m in metadata.items() if hasattr(m, "size")}
    parts: list[StateTensors] = [model_state(model, loading=True)]
    for index, optimizer in enumerate(prepared.optimizers):
        parts.append(optimizer_targets(model, optimizer, index=index, saved=saved))
    tensors = {k: v for part in parts for k, v in part.tensors.items()}
    _dcp().load(tensors, checkpoint_id=path, no_dist=not dist.is_initialized())
    for part in parts:
        part.finish()
    for optimizer in prepared.optimizers:  # offloaded copies of the parameters take their loaded values
        refresh_pieces(optimizer)


def _restore(prepared: Prepared, path: Path, summary: dict[str, Any]) -> None:
    if len(summary["groups"]) != len(prepared.optimizers):
        raise UsageError(
            f"the state in {path} holds {len(summary['groups'])} optimizers but prepare() was given "
            f"{len(prepared.optimizers)}: prepare the same optimizers as the run that saved it"
        )
    for optimizer, groups in zip(prepared.optimizers, summary["groups"]):
        for group, saved in zip(optimizer.param_groups, groups):
            group.update(saved)
    for obj, state in zip(prepared.stateful, summary["stateful"]):
        obj.load_state_dict(state)
    for loader, position in zip(prepared.loaders, summary["loaders"]):
        loader.position.resume_at(position, loader.order_generator())
    prepared.optimizer_steps[0] = summary["optimizer_steps"]
    worker = prepared.worker
    same = summary["workers"] == worker.world_size and summary["plan"] == _plan_name(prepared)
    rank = worker.rank if summary["workers"] == worker.world_size else 0
    prepared.set_random_state(torch.load(path / files.RANDOM.format(rank=rank), weights_only=False))
    if not same and worker.is_main:
        print(
            f"onegpu: resuming on {worker.world_size} workers ({_plan_name(prepared)}) a state saved on "
            f"{summary['workers']} ({summary['plan']}): random numbers drawn inside the model (dropout masks) "
            "differ from an uninterrupted run's; data order, schedules and everything else continue exactly",
            file=sys.stderr,
            flush=True,
        )


def _plan_name(prepared: Prepared) -> str:
    plan = getattr(prepared.model, "onegpu_plan", None)
    return plan.describe() if plan is not None else "one worker"
