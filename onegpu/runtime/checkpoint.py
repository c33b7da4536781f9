"""One consolidated single-device checkpoint, written atomically by rank 0."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from onegpu.errors import UsageError
from onegpu.launch.status import endings
from onegpu.runtime.distributed import collective_timeout, current_worker
from onegpu.runtime.watchdog import process_watchdog

WEIGHTS_NAME = "model.safetensors"


def user_class(model: nn.Module) -> type:
    """The user's model class behind the wrappers DDP/FSDP put in front of it."""
    return next(c for c in type(model).__mro__ if c.__module__.split(".")[0] != "torch" or c is nn.Module)


def held_whole(model: nn.Module) -> bool:
    """Whether every worker holds all of ``model`` (one worker, DDP, a model never prepared): no part of
    it is sharded, split into tensor-parallel pieces or cut into pipeline stages."""
    if current_worker().world_size == 1:
        return True
    from onegpu.runtime.pipelined import PipelinedModel

    if isinstance(model, PipelinedModel):
        return False
    return not any(hasattr(tensor, "full_tensor") for tensor in model.state_dict().values())  # DTensors: split


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on the CPU. A model every worker holds whole: read here, with no
    communication. A split one (FSDP, tensor or pipeline parallel): gathered from every worker (each
    must call this) onto rank 0, empty elsewhere."""
    if held_whole(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from onegpu.runtime.pipelined import PipelinedModel, pipeline_state_dict

    if isinstance(model, PipelinedModel):
        return pipeline_state_dict(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # 1 s to import

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    orders = getattr(model, "onegpu_fused_orders", None)
    if orders and state:  # tensor parallelism permuted fused layers' outputs: back to the model's order
        from onegpu.parallel.tensor_parallel import unpermuted

        state = unpermuted(state, orders)
    return state


EVERY_WORKER = "save_pretrained (every worker must call it)"


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as one checkpoint a single plain process can load without onegpu; rank 0 writes it.

    Hugging Face models: ``from_pretrained(path)`` format. Other modules:
    ``path/model.safetensors`` for ``load_state_dict(safetensors.torch.load_file(...))``.
    The directory appears whole or not at all; an existing one is replaced. When every worker holds
    the whole model (one worker, DDP) no worker waits for another, so ``if onegpu.is_main_process():
    onegpu.save_pretrained(...)`` works; when the model is split among the workers (FSDP, tensor or
    pipeline parallel), call it on every worker: they gather the model onto rank 0.
    """
    worker = current_worker()
    target = Path(path).resolve()
    if held_whole(model):
        if worker.is_main:
            _write_atomically(_whole(model), full_state_dict(model), target)
        return target
    watchdog = process_watchdog(rank=worker.rank, timeout_s=collective_timeout())
    watchdog.enter(EVERY_WORKER)  # a worker left waiting here is reported by rank and phase
    try:
        _meet_every_worker(model, worker=worker)
        state = full_state_dict(model)
    finally:
        watchdog.leave()
    if worker.is_main:
        _write_atomically(_whole(model), state, target)
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


def _whole(model: nn.Module) -> nn.Module:
    """The user's model behind a pipeline stage (its class and config are what a checkpoint records)."""
    from onegpu.runtime.pipelined import PipelinedModel

    return model.model if isinstance(model, PipelinedModel) else model


def _write_atomically(model: nn.Module, state: dict[str, torch.Tensor], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        if hasattr(model, "save_pretrained") and hasattr(model, "config"):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # one file, no bar needed
            try:
                model.save_pretrained(staging, state_dict=state, safe_serialization=True)
            finally:
                hf_logging.enable_progress_bar()
            _fix_architectures(staging / "config.json", user_class(model).__name__)
        else:
            save_file(_unshared(state), str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        _fsync_tree(staging)
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _replace(staging: Path, target: Path) -> None:
    """Swap ``staging`` into ``target``; an old ``target`` is removed only once the new one is in place."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
