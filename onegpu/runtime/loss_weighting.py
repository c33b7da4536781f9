"""The one rule that makes N workers' losses the loss of one device on the global batch, under every plan.

A loss is a mean over a batch. Each worker (under a pipeline, each micro-batch) computes the loss of
its slice; the global loss is the mean over the whole batch. So every slice's loss, and the
gradient it sends back, is weighted by the slice's share of the global batch, and data-parallel
replicas then SUM their gradients (never average them). The share counts:

- for Hugging Face token-level losses (causal LM, masked LM, token classification), the label tokens
  that count (not -100; shifted for causal LMs). The global count is passed to the model as
  ``num_items_in_batch``, so its loss is already its share of the global token mean, exactly as on one
  device even when padding differs between slices;
- for every other loss (a 0-dim output, ``output.loss``, the user's ``loss_fn``), samples: exact for
  losses that are means over samples (the PyTorch and HF default);
- when the user computes the loss from the outputs, the gradients flowing back into the outputs are
  weighted by the slice's samples.

The loss the user sees is the global-batch loss, the same value on every worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from onegpu.batches import batch_size, tensors_in
from onegpu.errors import UsageError
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


class Counts:
    """A slice's samples and counted tokens, and the global batch's (summed over the data-parallel group)."""

    def __init__(self, *, samples: int, tokens: int | None, group=None, device: torch.device) -> None:
        totals = torch.tensor([float(tokens or 0), float(samples)], dtype=torch.float64, device=device)
        if group is not None:
            dist.all_reduce(totals, group=group)
        self.samples, self.tokens = samples, tokens
        self.global_tokens, self.global_samples = int(totals[0]), int(totals[1])

    @property
    def counted(self) -> bool:
        """Whether the loss counts tokens itself (it is then given ``num_items_in_batch``)."""
        return self.tokens is not None

    def share(self, samples: int | None = None) -> float:
        """The weight of a loss that is a mean over ``samples`` (default: the slice's) of the global batch."""
        return (self.samples if samples is None else samples) / self.global_samples

    def model_inputs(self, kwargs: dict[str, Any], *, device: torch.device) -> dict[str, Any]:
        if not self.counted:
            return kwargs
        return {**kwargs, "num_items_in_batch": torch.tensor(self.global_tokens, device=device)}


def find_loss(output: Any) -> torch.Tensor | None:
    """The loss in a model's output: a 0-dim floating tensor, ``output.loss``, or the one such tensor of a
    tuple or list (first, or at any position: nanoGPT's ``(logits, loss)``)."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output:
        losses = [v for v in output if _is_loss(v)]
        loss = losses[0] if len(losses) == 1 else output[0]
    if loss is None:
        loss = output
    return loss if _is_loss(loss) else None


def _is_loss(value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() == 0 and value.is_floating_point()


def replace_loss(output: Any, loss: torch.Tensor) -> Any:
    if torch.is_tensor(output):
        return loss
    if getattr(output, "loss", None) is not None:
        output.loss = loss
        return output
    index = next(i for i, v in enumerate(output) if v is find_loss(output))
    return type(output)((*output[:index], loss, *output[index + 1 :]))


class _GlobalLoss(torch.autograd.Function):
    """Shows the global loss value; sends this worker's weighted gradient back to its local loss."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, global_value: float, grad_scale: float, watchdog: Watchdog | None):
        ctx.grad_scale, ctx.watchdog = grad_scale, watchdog
        return torch.full_like(local, global_value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.watchdog is not None:
            watch_backward(ctx.watchdog)
        return grad * ctx.grad_scale, None, None, None


def watch_backward(watchdog: Watchdog) -> None:
    """Mark the rest of this backward pass as a communicating phase."""
    watchdog.enter("backward (gradient reduction)")
    torch.autograd.Variable._execution_engine.queue_callback(watchdog.leave)


class GlobalBatchHooks:
    """Forward hooks on the user's model (plans without a pipeline) that turn per-slice losses into the
    global-batch loss. ``group``: the workers that read different slices (None: this one alone)."""

    def __init__(self, module: nn.Module, *, group, device: torch.device, watchdog: Watchdog | None) -> None:
        self.group, self.device, self.watchdog = group, device, watchdog
        self.counts: Counts | None = None
        module.register_forward_pre_hook(self._before, with_kwargs=True, prepend=True)
        module.register_forward_hook(self._after, with_kwargs=True)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if self.watchdog is not None:
            self.watchdog.enter("forward")
        samples, tokens = batch_size(args, kwargs), counted_label_tokens(module, kwargs)
        self.counts = Counts(samples=samples, tokens=tokens, group=self.group, device=self.device)
        return args, self.counts.model_inputs(kwargs, device=self.device)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        counts, loss = self.counts, find_loss(output)
        if loss is not None:
            share = 1.0 if counts.counted else counts.share()  # a counted loss is already its share
            (value,) = _sum([loss.item() * share], group=self.group, device=self.device)
            output = replace_loss(output, _GlobalLoss.apply(loss, value, share, self.watchdog))
        elif torch.is_grad_enabled():
            self._weight_output_gradients(output, counts.share())
        if self.watchdog is not None:
            self.watchdog.leave()
        return output

    def _weight_output_gradients(self, output: Any, share: float) -> None:
        def weight(grad: torch.Tensor) -> torch.Tensor:
            if self.watchdog is not None and self.watchdog.phase is None:
                watch_backward(self.watchdog)
            return grad * share

        for tensor in tensors_in(output):
            if tensor.requires_grad and not getattr(tensor, "onegpu_global_rows", False):  # gathered: global already
                tensor.register_hook(weight)


def _sum(values: list[float], *, group, device: torch.device) -> list[float]:
    if group is None:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


class MicroBatchLoss:
    """A pipeline's loss function: each micro-batch's share of the global-batch loss (the rule above, per
    micro-batch). ``loss_fn(output, target)``: the user's, for a model that does not compute its loss."""

    def __init__(self, model: nn.Module, *, group=None, loss_fn: Callable | None = None) -> None:
        self.model, self.group, self.loss_fn = model, group, loss_fn
        self.counts: Counts | None = None

    def inputs(self, inputs: dict[str, Any], target: Any = None) -> tuple[dict[str, Any], torch.Tensor]:
        """The model's inputs for the schedule, and the target it cuts along with them: the user's, for
        ``loss_fn``, or a per-sample one that carries micro-batch sizes."""
        if self.loss_fn is not None and target is None:
            raise UsageError("prepare() was given a loss_fn: call the model as model(inputs, target=...)")
        first = next(v for v in inputs.values() if torch.is_tensor(v) and v.dim() > 0)
        samples = first.shape[0]
        if target is not None and (not torch.is_tensor(target) or target.dim() == 0 or len(target) != samples):
            raise UsageError(f"target must be a tensor with one row per sample ({samples}), like the inputs")
        tokens = counted_label_tokens(self.model, inputs)
        self.counts = Counts(samples=samples, tokens=tokens, group=self.group, device=first.device)
        inputs = self.counts.model_inputs(inputs, device=first.device)
        return inputs, torch.ones(samples, device=first.device) if target is None else target

    @property
    def samples(self) -> int:
        return self.counts.samples

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            output = self.loss_fn(output, target)
        return output if self.counts.counted else output * self.counts.share(len(target))
