"""Mixed precision under every layout: bf16 (or fp16) compute on fp32 master weights.

One mechanism for every plan, FSDP2's ``MixedPrecisionPolicy`` on the data-parallel units
(:mod:`onegpu.parallel.data_parallel`): each unit's parameters are cast to the compute dtype when it
runs, forward and backward compute in it, and each gradient is cast to fp32 before it is reduced
(summed across replicas, or accumulated over micro-batches), so the optimizer steps fp32 parameters
with fp32 state. A layout without data parallelism (tensor parallel or pipelined at dp=1, one
worker) gets the same units at degree 1 only to carry the policy: so every layout rounds as the one
emulated bf16 device does, and a run on one worker and on N agree as in fp32, except tensor
parallelism, whose row layers sum bf16 partial products.

The model's outputs leave in fp32 (its loss as the loop sees it, logits); a pipeline's activations
between stages stay in the compute dtype. fp16, whose range is too small for gradients, adds a
dynamic loss scale (:mod:`onegpu.runtime.loss_scale`) and runs on accelerators only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

from onegpu.batches import map_tensors
from onegpu.errors import UsageError

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def is_mixed(precision: str) -> bool:
    """Whether ``precision`` computes in a low-precision dtype (fp32 does not)."""
    return precision in COMPUTE_DTYPES


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype forward and backward compute in under ``precision``."""
    return COMPUTE_DTYPES.get(precision, torch.float32)


def mixed_precision_policy(precision: str, *, outputs_in_fp32: bool) -> MixedPrecisionPolicy:
    """FSDP2's policy for one unit: parameters cast to the compute dtype, gradients reduced in fp32;
    ``outputs_in_fp32`` for the unit whose outputs the loop sees (the model, a pipeline's last stage)."""
    if not is_mixed(precision):
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(
        param_dtype=compute_dtype(precision),
        reduce_dtype=torch.float32,
        output_dtype=torch.float32 if outputs_in_fp32 else None,
    )


def reshard_after_evaluation(module: nn.Module) -> None:
    """After a forward without gradients (evaluation) ``module``'s units drop their low-precision working copies,
    which FSDP2 keeps until a backward: the loop sees the fp32 parameters again, as after a training step."""
    from torch.distributed.fsdp import FSDPModule

    def reshard(*_: object) -> None:
        if not torch.is_grad_enabled():
            for unit in module.modules():
                if isinstance(unit, FSDPModule):
                    unit.reshard()

    module.register_forward_hook(reshard)


def check_precision(precision: str, *, device: torch.device) -> None:
    """fp16 needs an accelerator: its loss scaling exists for GPU kernels, and bf16 is the CPU's choice."""
    if precision == "fp16" and device.type == "cpu":
        raise UsageError(
            "fp16 mixed precision runs on GPUs only: use precision='bf16' (mixed_precision='bf16') on CPUs"
        )


def as_fp32(outputs: Any, precision: str) -> Any:
    """A model's outputs kept inside a layout (a pipeline's, in evaluation), in fp32 as every output leaves."""
    if not is_mixed(precision):
        return outputs
    return map_tensors(outputs, lambda t: t.float() if t.is_floating_point() else t)


def cast_shape_only(model: nn.Module, precision: str) -> None:
    """Modules a pipeline stage only runs for the shapes of their outputs (the embedding on a later stage) make
    them in the compute dtype, as the working parameters would (rotary tables follow the embedding's dtype)."""
    if not is_mixed(precision):
        return
    from onegpu.parallel.pipeline import ShapeOnly

    for module in model.modules():
        if isinstance(module, ShapeOnly):
            for param in module.original.parameters():
                param.data = param.data.to(compute_dtype(precision))
