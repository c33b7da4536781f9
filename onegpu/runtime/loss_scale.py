"""fp16's dynamic loss scale, applied without changing the user's loop (what ``torch.amp.GradScaler`` does).

fp16 gradients underflow, so the backward runs on the loss times a scale S (a power of two): every
floating output of the model sends S times its gradient back (a pipeline: every micro-batch's loss).
The data-parallel units cast each gradient to fp32 and divide it by S once it is reduced (FSDP2's
all-reduce hook, which sees each reduced gradient once, however many calls accumulated it), so the loop, ``clip_grad_norm_`` and the optimizer see true fp32 gradients.
Before each optimizer step the workers agree whether any gradient is inf or nan; if so the step is
skipped (no parameter has a gradient) and S halves; after ``growth_interval`` good steps S doubles.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from onegpu.batches import map_tensors

INITIAL_SCALE = 2.0**16
GROWTH_INTERVAL = 2000


class _Scaled(torch.autograd.Function):
    """The value unchanged; its gradient times the current scale."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, scaler: DynamicLossScale) -> torch.Tensor:
        ctx.scaler = scaler
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scaler.scale, None


class DynamicLossScale:
    """The loss scale of one fp16 model and its optimizers (``initial``, halved on overflow, doubled after
    ``growth_interval`` steps without)."""

    def __init__(
        self,
        model: nn.Module,
        optimizers: tuple[torch.optim.Optimizer, ...],
        *,
        initial: float = INITIAL_SCALE,
        growth_interval: int = GROWTH_INTERVAL,
    ) -> None:
        self.model, self.scale, self.growth_interval, self.good_steps = model, initial, growth_interval, 0
        self.skipped = 0
        pipeline = model.__dict__.get("onegpu_pipeline")
        if pipeline is not None:
            _scale_micro_batch_losses(pipeline, self)
        else:
            model.register_forward_hook(self._scale_outputs)
        for optimizer in optimizers:
            optimizer.register_step_pre_hook(self._before_step)
        from torch.distributed.fsdp import FSDPModule

        stages = list(pipeline.stages.values()) if pipeline is not None else []  # not the model's submodules
        units = {id(m): m for root in (model, *stages) for m in root.modules() if isinstance(m, FSDPModule)}
        for unit in units.values():
            unit.set_all_reduce_hook(self._unscale)

    def _unscale(self, reduced: torch.Tensor) -> None:
        reduced.div_(self.scale)

    def _scale_outputs(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not torch.is_grad_enabled():
            return output
        return map_tensors(output, lambda t: _Scaled.apply(t, self) if t.requires_grad and t.is_floating_point() else t)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        local = [getattr(p.grad, "_local_tensor", p.grad) for p in params]
        device = local[0].device if local else torch.device("cpu")
        overflow = torch.zeros((), device=device)
        for grad in local:
            overflow = torch.maximum(overflow, (~torch.isfinite(grad)).any().to(overflow.dtype))
        if dist.is_initialized() and dist.get_world_size() > 1:  # every worker skips, or none
            dist.all_reduce(overflow, op=dist.ReduceOp.MAX)
        if overflow.item():
            for param in params:
                param.grad = None  # the optimizer leaves a parameter without a gradient as it is
            self.scale, self.good_steps, self.skipped = self.scale / 2, 0, self.skipped + 1
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale, self.good_steps = self.scale * 2, 0


def _scale_micro_batch_losses(pipeline: Any, scaler: DynamicLossScale) -> None:
    """A pipeline runs backward on each micro-batch's loss inside its schedule: scale those."""
    loss = pipeline.loss
    base = type(loss)

    def scaled(self, output: Any, rows: torch.Tensor) -> torch.Tensor:
        value = base.__call__(self, output, rows)
        return _Scaled.apply(value, scaler) if torch.is_grad_enabled() else value

    loss.__class__ = type(f"Scaled{base.__name__}", (base,), {"__call__": scaled})
