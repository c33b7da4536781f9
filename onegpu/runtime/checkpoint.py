"""One consolidated single-device checkpoint, written atomically by rank 0."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import itertools
import json
import os
import re
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from onegpu.errors import UsageError
from onegpu.launch.process_group import collective_timeout, current_worker
from onegpu.launch.status import endings
from onegpu.runtime.watchdog import process_watchdog

WEIGHTS_NAME = "model.safetensors"
MARKER = ".onegpu"  # in every checkpoint and copy onegpu writes: what it may replace or clean up
WEIGHTS_FILES = re.compile(r".+\.safetensors|pytorch_model.*\.bin")
# what a save replaces in an earlier checkpoint; anything else there (a tokenizer, a README) is kept
CHECKPOINT_FILES = re.compile(rf"{WEIGHTS_FILES.pattern}|(model|pytorch_model)\.(safetensors|bin)\.index\.json"
                              r"|config\.json|generation_config\.json")  # fmt: skip
AT_FDCWD, RENAME_EXCHANGE = -100, 2


def user_class(model: nn.Module) -> type:
    """The user's model class behind the classes FSDP2 or a pipeline put in front of it."""
    return next(
        c for c in type(model).__mro__ if c.__module__.split(".")[0] not in ("torch", "onegpu") or c is nn.Module
    )


def _whole_value(tensor: torch.Tensor) -> torch.Tensor | None:
    """A state tensor as this worker holds it whole (a replicated DTensor's local value), or None when split."""
    if not hasattr(tensor, "full_tensor"):
        return tensor
    if all(placement.is_replicate() for placement in tensor.placements) or tensor.device_mesh.size() == 1:
        return tensor.to_local()  # replicated, or the one worker's units of mixed precision
    return None


def held_whole(model: nn.Module) -> bool:
    """Whether every worker holds all of ``model`` (one worker, DDP, a model never prepared): no part of
    it is sharded, split into tensor-parallel pieces or cut into pipeline stages."""
    if current_worker().world_size == 1:
        return True
    if "onegpu_pipeline" in model.__dict__:
        return False
    return all(_whole_value(tensor) is not None for tensor in model.state_dict().values())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on the CPU. A model every worker holds whole: read here, with no
    communication. A split one (FSDP, tensor or pipeline parallel): gathered from every worker (each
    must call this) onto rank 0, empty elsewhere."""
    if held_whole(model):
        return {k: _whole_value(v).detach().cpu() for k, v in model.state_dict().items()}
    if "onegpu_pipeline" in model.__dict__:
        from onegpu.runtime.pipelined import pipeline_state_dict

        return pipeline_state_dict(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # 1 s to import

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    changes = getattr(model, "onegpu_split_changes", None)
    if changes is not None and state:  # tensor parallelism's permuted fused layers and padded vocabulary
        state = changes.undo(state)
    return state


EVERY_WORKER = "save_pretrained (every worker must call it)"


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as one checkpoint a single plain process can load without onegpu; rank 0 writes it.

    Hugging Face models: ``from_pretrained(path)`` format. Other modules:
    ``path/model.safetensors`` for ``load_state_dict(safetensors.torch.load_file(...))``.
    The directory appears whole or not at all; an earlier checkpoint there is replaced in one step (the
    path holds the old or the new one, even after a crash), a file or a directory of other things is
    refused. When every worker holds the whole model (one worker, DDP) no worker waits for another, so
    ``if onegpu.is_main_process(): onegpu.save_pretrained(...)`` works; when the model is split among the
    workers (FSDP, tensor or pipeline parallel), call it on every worker: they gather the model onto rank 0.
    """
    worker = current_worker()
    target = Path(path).resolve()
    check_target(target)
    if held_whole(model):
        if worker.is_main:
            _write_atomically(model, full_state_dict(model), target)
        return target
    watchdog = process_watchdog(rank=worker.rank, timeout_s=collective_timeout())
    watchdog.enter(EVERY_WORKER)  # a worker left waiting here is reported by rank and phase
    try:
        _meet_every_worker(model, worker=worker)
        state = full_state_dict(model)
    finally:
        watchdog.leave()
    if worker.is_main:
        _write_atomically(model, state, target)
    return target


_SAVES = itertools.count()


def _meet_every_worker(model: nn.Module, *, worker) -> None:
    """Wait, outside any collective, until every worker has called save_pretrained. A call that the
    others do not match (one has ended, or they have not come for half the collective timeout) is
    refused with the fix, before any worker is left inside a collective."""
    store = dist.distributed_c10d._get_default_store()
    key = f"onegpu/save_pretrained/{next(_SAVES)}"
    store.set(f"{key}/{worker.rank}", "")
    store.add(key, 1)
    started, limit = time.monotonic(), collective_timeout() / 2
    while store.add(key, 0) < worker.world_size:
        waited, ended = time.monotonic() - started, endings()
        if ended:
            problem = f"was called on rank {worker.rank} after rank {ended[0].rank} had ended"
        elif waited > limit:
            missing = ", ".join(str(r) for r in range(worker.world_size) if not store.check([f"{key}/{r}"]))
            problem = f"waited {waited:.0f} s on rank {worker.rank} for rank {missing} to call it too"
        else:
            time.sleep(0.05)
            continue
        plan = getattr(model, "onegpu_plan", None)
        raise UsageError(
            f"onegpu.save_pretrained {problem}: the model is split among the workers"
            f"{f' ({plan.strategy})' if plan else ''}, so call it on every worker, not only on the main process"
        )


def check_target(target: Path) -> None:
    """Refuse, before any work, a file or a directory that holds no checkpoint: replacing it would lose data."""
    if target.is_dir():
        entries = sorted(entry.name for entry in target.iterdir())
        if not entries or MARKER in entries or any(WEIGHTS_FILES.fullmatch(entry) for entry in entries):
            return
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UsageError(
            f"save_pretrained: {target} is a directory that holds no checkpoint ({shown}): "
            "give a new path, or empty that directory"
        )
    existing = next(p for p in (target, *target.parents) if p.exists() or p.is_symlink())
    if existing == target or not existing.is_dir():
        raise UsageError(
            f"save_pretrained: {existing} is a file: give the path of a directory to write the checkpoint in"
        )


def _write_atomically(model: nn.Module, state: dict[str, torch.Tensor], target: Path) -> None:
    check_target(target)  # again: something may have appeared there while the state was gathered
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_copies(target)
    staging = Path(tempfile.mkdtemp(prefix=f"{_copy_prefix(target)}{os.getpid()}-", dir=target.parent))
    try:
        (staging / MARKER).write_text("Written by onegpu.save_pretrained: onegpu may replace this directory.\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        _write(model, state, staging)
        _keep_others(target, staging)
        _fsync_tree(staging)
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one file, no bar needed
        try:
            model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        finally:
            hf_logging.enable_progress_bar()
        _fix_architectures(directory / "config.json", user_class(model).__name__)
    else:
        save_file(_unshared(state), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def _keep_others(target: Path, staging: Path) -> None:
    """What a user added to an earlier checkpoint (a tokenizer, a README) stays, linked into the new one."""
    if not target.is_dir():
        return
    for entry in target.iterdir():
        if entry.name == MARKER or CHECKPOINT_FILES.fullmatch(entry.name) or (staging / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, staging / entry.name)


def _link_or_copy(source: Path | str, destination: Path | str) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each its own."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def _fix_architectures(config_path: Path, class_name: str) -> None:
    config = json.loads(config_path.read_text())
    config["architectures"] = [class_name]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _fsync_tree(directory: Path) -> None:
    for path in (*directory.rglob("*"), directory):
        if path.is_file() or path.is_dir():
            _fsync(path)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _replace(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target`` in one step: the path holds the old checkpoint or the new one, never neither.

    An old one is swapped out (Linux ``renameat2(RENAME_EXCHANGE)``) and then removed; where the system cannot
    swap, it is renamed aside first, the one moment a crash would leave the path empty.
    """
    if not target.exists():
        os.rename(staging, target)
    elif not _exchange(staging, target):
        old = staging.with_name(staging.name + "-old")
        os.rename(target, old)
        os.rename(staging, target)
        staging = old
    _fsync(target.parent)
    if staging.exists():  # the old checkpoint: a crash before it is gone leaves it for the next save to remove
        with contextlib.suppress(OSError):
            _remove(staging)


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically; False where this system or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def _copy_prefix(target: Path) -> str:
    """How the hidden copies of saves to ``target`` from this machine begin; the writer's pid follows."""
    return f".{target.name}.partial-{zlib.crc32(socket.gethostname().encode()):08x}-"


def _remove_stale_copies(target: Path) -> None:
    """Remove the copies beside ``target`` that killed saves from this machine left: onegpu's name and marker,
    and a writer that is no longer running (or is this process). Live saves and anything else are left alone."""
    prefix = _copy_prefix(target)
    for sibling in target.parent.iterdir():
        pid = sibling.name.removeprefix(prefix).split("-")[0]
        if not sibling.name.startswith(prefix) or not pid.isdigit() or sibling.is_symlink():
            continue
        if (sibling / MARKER).is_file() and (int(pid) == os.getpid() or not _running(int(pid))):
            with contextlib.suppress(OSError):
                _remove(sibling)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _remove(directory: Path) -> None:
    """Delete a copy onegpu made, its marker last: a kill midway leaves it recognisable to the next save."""
    for child in directory.iterdir():
        if child.name != MARKER:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    (directory / MARKER).unlink(missing_ok=True)
    directory.rmdir()
