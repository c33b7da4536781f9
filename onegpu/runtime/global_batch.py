"""Make every worker's forward behave as one forward over the global batch.

Each worker sees a slice of the global batch. A loss is a mean over its slice, so the
global loss is a weighted mean of the workers' losses, and each worker's gradient must be
weighted by its share before data parallelism averages gradients over workers.

Weights, chosen once per forward:
- Hugging Face models with a token-level loss (causal LM, masked LM, token classification):
  the number of label tokens that count (not -100; shifted for causal LMs). The global count
  is passed to the model as ``num_items_in_batch``, so each worker's loss is its share of the
  global token mean, exactly as on one device, even when padding differs between slices.
- every other loss (a 0-dim output, or ``output.loss``): the slice's number of samples, which
  is exact for losses that are means over samples (the PyTorch and HF default).
- no loss in the output (the user computes it from the outputs): gradients flowing back into
  the outputs are weighted by the slice's number of samples.

The loss the user sees is the global-batch loss, the same value on every worker.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from onegpu.errors import UsageError
from onegpu.runtime.distributed import Worker, all_reduce_sum
from onegpu.runtime.watchdog import Watchdog

IGNORE_INDEX = -100
SHIFTED_LOSSES = {"ForCausalLM", "ForConditionalGeneration"}
TOKEN_LOSSES = SHIFTED_LOSSES | {"ForMaskedLM", "ForTokenClassification"}


def counted_label_tokens(module: nn.Module, kwargs: dict[str, Any]) -> int | None:
    """Label tokens a Hugging Face token-level loss averages over, or None for other models."""
    labels = kwargs.get("labels")
    loss_type = getattr(module, "loss_type", None)
    if loss_type is None and hasattr(module, "loss_function") and type(module).__name__.endswith("LMHeadModel"):
        loss_type = "ForCausalLM"  # what HF itself falls back to for these (GPT-2 and its kind)
    if not torch.is_tensor(labels) or loss_type not in TOKEN_LOSSES or "num_items_in_batch" in kwargs:
        return None
    if loss_type in SHIFTED_LOSSES:
        labels = kwargs.get("shift_labels", labels[..., 1:])
    return int((labels != IGNORE_INDEX).sum())


def batch_size(args: tuple, kwargs: dict[str, Any]) -> int:
    """Samples in a forward's inputs: the leading size of its first tensor."""
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.dim() > 0:
            return value.shape[0]
    raise UsageError(
        "onegpu could not find a batched tensor among the model's inputs: pass tensors whose first dimension is the batch"
    )


class _GlobalLoss(torch.autograd.Function):
    """Shows the global loss value; sends this worker's weighted gradient back to its local loss."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, global_value: float, grad_scale: float, watchdog: Watchdog):
        ctx.grad_scale, ctx.watchdog = grad_scale, watchdog
        return torch.full_like(local, global_value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        watch_backward(ctx.watchdog)
        return grad * ctx.grad_scale, None, None, None


def watch_backward(watchdog: Watchdog) -> None:
    """Mark the rest of this backward pass as a communicating phase."""
    watchdog.enter("backward (gradient reduction)")
    torch.autograd.Variable._execution_engine.queue_callback(watchdog.leave)


def find_loss(output: Any) -> torch.Tensor | None:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output:
        loss = output[0]
    if loss is None:
        loss = output
    if torch.is_tensor(loss) and loss.dim() == 0 and loss.is_floating_point():
        return loss
    return None


def replace_loss(output: Any, loss: torch.Tensor) -> Any:
    if torch.is_tensor(output):
        return loss
    if getattr(output, "loss", None) is not None:
        output.loss = loss
        return output
    return type(output)((loss, *output[1:]))


def output_tensors(output: Any) -> list[torch.Tensor]:
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in output_tensors(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in output_tensors(value)]
    return []


class GlobalBatchHooks:
    """Forward hooks on the user's model that turn per-slice losses into the global-batch loss."""

    def __init__(
        self, module: nn.Module, *, worker: Worker, watchdog: Watchdog, data_group=None, replicas: int | None = None
    ) -> None:
        """``data_group`` and ``replicas``: the workers that read different slices, and how many there are
        (default: all of them; under tensor parallelism, one per replica)."""
        self.worker, self.watchdog = worker, watchdog
        self.group, self.replicas = data_group, replicas or worker.world_size
        self._tokens: float | None = None
        self._samples = 0
        module.register_forward_pre_hook(self._before, with_kwargs=True, prepend=True)
        module.register_forward_hook(self._after, with_kwargs=True)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        self.watchdog.enter("forward")
        self._samples = batch_size(args, kwargs)
        count = counted_label_tokens(module, kwargs)
        self._tokens = None
        if count is not None:
            (self._tokens,) = all_reduce_sum([count], worker=self.worker, group=self.group)
            kwargs = {**kwargs, "num_items_in_batch": torch.tensor(int(self._tokens), device=self.worker.device)}
        return args, kwargs

    def _after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        world, loss = self.replicas, find_loss(output)
        if loss is not None and self._tokens is not None:
            # each worker's loss is already (its token sum) / (global token count)
            (global_value,) = all_reduce_sum([loss.item()], worker=self.worker, group=self.group)
            output = replace_loss(output, _GlobalLoss.apply(loss, global_value, float(world), self.watchdog))
        elif loss is not None:
            weighted, total = all_reduce_sum(
                [loss.item() * self._samples, self._samples], worker=self.worker, group=self.group
            )
            scale = self._samples * world / total
            output = replace_loss(output, _GlobalLoss.apply(loss, weighted / total, scale, self.watchdog))
        elif torch.is_grad_enabled():
            (total,) = all_reduce_sum([self._samples], worker=self.worker, group=self.group)
            self._weight_output_gradients(output, self._samples * world / total)
        self.watchdog.leave()
        return output

    def _weight_output_gradients(self, output: Any, scale: float) -> None:
        def weight(grad: torch.Tensor) -> torch.Tensor:
            if self.watchdog.phase is None:
                watch_backward(self.watchdog)
            return grad * scale

        for tensor in output_tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(weight)
