"""BatchNorm over the global batch: each replica normalises its slice with the whole batch's statistics.

On one device, a BatchNorm layer in training mode normalises by the mean and variance of the whole
batch and folds them into its running statistics. Each data-parallel replica sees only its slice, so
every BatchNorm layer (``BatchNorm1d/2d/3d``, and a ``SyncBatchNorm`` the user gave) gets a forward
that sums, per channel, the slice's values, squares and count over the replicas with one
differentiable all-reduce (slices may be uneven: counts weight them, means are never averaged),
normalises with the global mean and biased variance, and updates ``running_mean``, ``running_var``
(unbiased, by the global count) and ``num_batches_tracked`` exactly as ``nn.BatchNorm`` does. In
``eval()`` the running statistics are used, with no communication.

The same code runs on every device: torch's ``SyncBatchNorm`` refuses CPU tensors, and one
implementation is one behaviour to test. The layer keeps the user's class (a subclass of it is put
in front, as FSDP2 does) and its ``state_dict`` keys, so checkpoints load into a plain model.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from onegpu.errors import UsageError


def batch_norm_layers(model: nn.Module) -> list[str]:
    """The paths of ``model``'s BatchNorm layers (``SyncBatchNorm`` included)."""
    return [name for name, module in model.named_modules() if isinstance(module, _BatchNorm)]


def refuse_micro_batches(model: nn.Module) -> None:
    """For a plan with a pipeline or micro-batches: each stage or micro-batch would normalise by statistics of its
    own, and one device's whole-batch statistics cannot be reproduced."""
    layers = batch_norm_layers(model)
    if layers:
        raise UsageError(no_micro_batches_for(type(model).__name__, layers[0]))


def no_micro_batches_for(model_name: str, layer: str) -> str:
    """The one line refusing micro-batches (pipelines) to a model with BatchNorm ``layer``."""
    return (
        f"{model_name} has BatchNorm layers ({layer!r}), whose batch statistics micro-batches cannot share: "
        f"use a plan without pp or micro-batches (data or tensor parallelism)"
    )


def apply_global_batch_norm(model: nn.Module, *, group: dist.ProcessGroup | None) -> None:
    """Make every BatchNorm layer of ``model`` normalise by the statistics of the batch summed over ``group``
    (the data-parallel replicas), in place. ``group=None`` (one replica): only a ``SyncBatchNorm`` changes,
    to normalise by its own batch, which here is the global one."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and (group is not None or isinstance(module, nn.SyncBatchNorm)):
            if not isinstance(module, GlobalBatchNorm):
                module.__class__ = _global_class(type(module))
            module.__dict__["onegpu_group"] = group


@functools.cache
def _global_class(cls: type[_BatchNorm]) -> type:
    return type(f"Global{cls.__name__}", (GlobalBatchNorm, cls), {})


class GlobalBatchNorm:
    """Put in front of the user's BatchNorm class: statistics over the data-parallel group."""

    onegpu_group: dist.ProcessGroup | None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training and self.running_mean is not None:  # eval: the running statistics, nothing to share
            return super().forward(input)
        self._check_input_dim(input)
        tracked = self.training and self.track_running_stats
        mean, var, count = global_statistics(
            input, group=self.onegpu_group, shift=self.running_mean if tracked else None
        )
        if input.numel() <= input.size(1) and count.item() <= 1:  # asked only of a tiny slice
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        if tracked:
            self._update_running_statistics(mean.detach(), var.detach(), count)
        return normalize(input, mean.to(input.dtype), var.to(input.dtype), weight=self.weight, bias=self.bias,
                         eps=self.eps)  # fmt: skip

    @torch.no_grad()
    def _update_running_statistics(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """As ``nn.BatchNorm``: ``momentum=None`` is the cumulative average; the variance stored is unbiased."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1)
        for running, new in ((self.running_mean, mean), (self.running_var, unbiased)):
            running.copy_(factor * new + (1 - factor) * running)


def global_statistics(
    x: torch.Tensor, *, group: dist.ProcessGroup | None, shift: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (float64) of ``x`` (batch, channels, ...) over every replica's slice
    of the batch, and the values per channel counted. One all-reduce of [sum, sum of squares, count],
    differentiable: each replica's gradient reaches every slice. Sums are taken around ``shift`` (the running
    mean, the same on every replica) so that the variance does not cancel, and combined in float64."""
    dims, channels = [0, *range(2, x.dim())], x.size(1)
    centered = x if shift is None else x - shift.detach().to(x.dtype).view(1, -1, *[1] * (x.dim() - 2))
    sums = torch.cat(
        [
            centered.sum(dims, dtype=torch.float32).double(),
            centered.square().sum(dims, dtype=torch.float32).double(),
            x.new_full((1,), x.numel() // max(1, channels), dtype=torch.float64),
        ]
    )
    if group is not None:
        sums = _SumOverGroup.apply(sums, group)
    count = sums[-1]
    offset = sums[:channels] / count
    var = (sums[channels : 2 * channels] / count - offset.square()).clamp_min(0)
    return (offset if shift is None else offset + shift.detach().double()), var, count.detach()


class _SumOverGroup(torch.autograd.Function):
    """A sum over ``group`` whose gradient is the sum of every member's gradient (each replica's loss depends on
    every slice through the statistics)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def normalize(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, *, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:  # fmt: skip
    """``(x - mean) / sqrt(var + eps) * weight + bias``, per channel (dimension 1)."""
    shape = (1, -1, *[1] * (x.dim() - 2))
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    out = (x - mean.view(shape)) * scale.view(shape)
    return out if bias is None else out + bias.view(shape)
