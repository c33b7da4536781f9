"""One consolidated single-device checkpoint, written atomically by rank 0."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from onegpu.runtime.distributed import current_worker

WEIGHTS_NAME = "model.safetensors"


def user_class(model: nn.Module) -> type:
    """The user's model class behind the wrappers DDP/FSDP put in front of it."""
    return next(c for c in type(model).__mro__ if c.__module__.split(".")[0] != "torch" or c is nn.Module)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on the CPU of rank 0 (gathered from shards when sharded); empty elsewhere."""
    worker = current_worker()
    if worker.world_size == 1:
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


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as one checkpoint a single plain process can load without onegpu.

    Hugging Face models: ``from_pretrained(path)`` format. Other modules:
    ``path/model.safetensors`` for ``load_state_dict(safetensors.torch.load_file(...))``.
    The directory appears whole or not at all; an existing one is replaced. Call it on every worker.
    """
    worker = current_worker()
    target = Path(path).resolve()
    state = full_state_dict(model)
    error = None
    if worker.is_main:
        try:
            _write_atomically(_whole(model), state, target)
        except Exception as exc:  # tell the other workers, then raise on rank 0
            error = exc
    if worker.world_size > 1:
        flag = [repr(error) if error else None]
        dist.broadcast_object_list(flag, src=0)
        if flag[0] and not worker.is_main:
            raise RuntimeError(f"onegpu.save_pretrained failed on rank 0: {flag[0]}")
    if error is not None:
        raise error
    return target


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
