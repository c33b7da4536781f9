"""Accelerate, as the Trainer drives it, in its single-process mode inside a onegpu worker.

The Trainer sees one device, the virtual one: Accelerate must not wrap the model in DDP or FSDP, shard the
data loader or average losses, although torch.distributed is initialized with N workers. Accelerate decides
its mode from the launcher's variables (``LOCAL_RANK``, ``WORLD_SIZE``...) when its state is first built:
built with them hidden, it is in ``DistributedType.NO`` with one process. Its process index is then set to
this worker's rank, so that only rank 0 logs, prints and writes (``is_world_process_zero``, ``should_save``),
while ``num_processes`` stays 1 (batches are whole, nothing is gathered or split by Accelerate).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from onegpu.errors import UsageError
from onegpu.launch.process_group import Worker

LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
)  # fmt: skip
ACCELERATE_PARALLELISM = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM")


def check_training_args(args: Any) -> None:
    """Refuse in one line what would make Accelerate or the Trainer split the work themselves."""
    if args is None:
        raise UsageError(
            "the onegpu Trainer needs its TrainingArguments: pass args=TrainingArguments(output_dir=...) "
            "(checkpoints go to its output_dir)"
        )
    for name, what in (("fsdp", "FSDP"), ("deepspeed", "DeepSpeed"), ("parallelism_config", "a parallelism_config")):
        if getattr(args, name, None):
            raise UsageError(
                f"TrainingArguments sets {name} ({what}): onegpu splits the work itself; remove {name} from the "
                "TrainingArguments (onegpu.enable_advanced_parallelization() lets the planner choose sharding)"
            )
    launched = [v for v in ACCELERATE_PARALLELISM if os.environ.get(v, "").lower() in ("1", "true")]
    if launched:
        raise UsageError(
            f"{launched[0]} is set (accelerate launch?): start the script with `onegpu run --workers N train.py`, "
            "not accelerate launch"
        )


def check_model(model: Any) -> None:
    if model is not None and hasattr(model, "onegpu_plan"):
        raise UsageError(
            "the model given to the onegpu Trainer was already prepared by onegpu.prepare(): give the Trainer the "
            "model itself, it prepares it (with the optimizer and scheduler it creates)"
        )
    if getattr(model, "is_distributed_loading_by_transformers", False) or getattr(model, "device_mesh", None):
        raise UsageError(
            "the model was split when loaded (tp_plan or device_mesh in from_pretrained): load it whole, onegpu "
            "splits it"
        )


@contextlib.contextmanager
def _hidden_launcher(device: torch.device) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in LAUNCHER_VARIABLES if name in os.environ}
    previous = os.environ.get("ACCELERATE_TORCH_DEVICE")
    os.environ["ACCELERATE_TORCH_DEVICE"] = str(device)
    try:
        yield
    finally:
        os.environ.update(saved)
        if previous is None:
            os.environ.pop("ACCELERATE_TORCH_DEVICE", None)
        else:
            os.environ["ACCELERATE_TORCH_DEVICE"] = previous


def single_process_accelerate(args: Any, *, worker: Worker) -> None:
    """Build Accelerate's state for ``args`` (TrainingArguments) in single-process mode on this worker's device,
    with this worker's rank as its process index; the Trainer built next uses it."""
    from accelerate.state import PartialState

    args.__dict__.pop("_setup_devices", None)  # a device computed earlier (in distributed mode) is forgotten
    with _hidden_launcher(worker.device):
        _ = args._setup_devices
    args.__dict__["_setup_devices"] = worker.device  # not cuda:0 on every worker
    args._n_gpu = 0 if worker.device.type == "cpu" else 1  # never torch's DataParallel
    if worker.device.type != "cpu":
        torch.accelerator.set_device_index(worker.device.index or 0)
    state = PartialState()
    state.device = worker.device
    state.process_index, state.local_process_index = worker.rank, worker.local_rank
