"""The one rule that makes N workers' losses the loss of one device on the global batch, under every plan.

A loss is a mean over a batch. Each worker (under a pipeline, each micro-batch) computes the loss of
its slice; the global loss is the mean over the whole batch. So every slice's loss, and the
gradient it sends back, is weighted by the slice's share of the global batch, and data-parallel
replicas then SUM their gradients (never average them). The share counts:

- with ``prepare(..., count_items=f)``, what ``f(*inputs, **kwargs)`` counts on the slice (the tokens
  a custom model's ``ignore_index`` loss averages over, say): exact for any loss that is a mean over
  the items counted;
- for Hugging Face token-level losses (causal LM, masked LM, token classification), the label tokens
  that count (not -100; shifted for causal LMs). The global count is passed to the model as
  ``num_items_in_batch``, so its loss is already its share of the global token mean, exactly as on one
  device even when padding differs between slices;
- for every other loss (wherever the output holds it, :mod:`onegpu.outputs`; the user's ``loss_fn``),
  samples: exact for losses that are means over samples (the PyTorch and HF default);
- when the user computes the loss from the outputs, the gradients flowing back into the outputs are
  weighted by the slice's samples, once per path.

Only the loss is weighted, never also the outputs it was computed from.
The loss the user sees is the global-batch loss, the same value on every worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from onegpu.batches import batch_size, map_tensors, slice_batch
from onegpu.errors import UsageError
from onegpu.outputs import find_loss, replace_loss
from onegpu.runtime.own_share import calls_are_own
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
    """What a slice's loss averages over, and the global batch's (summed over the data-parallel group): its
    items (samples, or what the user's ``count_items`` counts) and, for Hugging Face token losses, its tokens."""

    def __init__(self, *, items: int, tokens: int | None, group=None, device: torch.device) -> None:
        totals = torch.tensor([float(tokens or 0), float(items)], dtype=torch.float64, device=device)
        if group is not None:
            dist.all_reduce(totals, group=group)
        self.items, self.tokens = items, tokens
        self.global_tokens, self.global_items = int(totals[0]), int(totals[1])

    @property
    def counted(self) -> bool:
        """Whether the loss counts tokens itself (it is then given ``num_items_in_batch``)."""
        return self.tokens is not None

    def share(self, items: int | None = None) -> float:
        """The weight of a loss that is a mean over ``items`` (default: the slice's) of the global batch's."""
        return (self.items if items is None else items) / max(self.global_items, 1)

    def model_inputs(self, kwargs: dict[str, Any], *, device: torch.device) -> dict[str, Any]:
        if not self.counted:
            return kwargs
        return {**kwargs, "num_items_in_batch": torch.tensor(self.global_tokens, device=device)}


def check_count_items(count_items: Callable | None) -> None:
    if count_items is not None and not callable(count_items):
        raise UsageError(
            f"count_items must be a function of the model's inputs returning the number of items its loss averages "
            f"over, e.g. lambda x, y: (y != -1).sum(); not {type(count_items).__name__}"
        )


def items_in(count_items: Callable, args: tuple, kwargs: dict[str, Any]) -> int:
    """The items a forward's loss averages over, as the user's ``count_items`` counts them."""
    return int(count_items(*args, **kwargs))


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
    global-batch loss. ``group``: the workers that read different slices (None: this one alone);
    ``count_items(*inputs)``: the items the model's loss averages over (None: samples). ``paused``: the call is
    a micro-batch its caller weights (:mod:`onegpu.runtime.micro_batches`)."""

    def __init__(
        self, module: nn.Module, *, group, device: torch.device, watchdog: Watchdog | None, count_items=None
    ) -> None:
        self.group, self.device, self.watchdog, self.count_items = group, device, watchdog, count_items
        self.counts: Counts | None = None
        self.paused = False
        module.register_forward_pre_hook(self._before, with_kwargs=True, prepend=True)
        module.register_forward_hook(self._after, with_kwargs=True)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if self.paused or calls_are_own():  # a micro-batch, or a replica's own call: not the global batch's
            return None
        if self.watchdog is not None:
            self.watchdog.enter("forward")
        if self.count_items is not None:
            items, tokens = items_in(self.count_items, args, kwargs), None
        else:
            items, tokens = batch_size(args, kwargs), counted_label_tokens(module, kwargs)
        self.counts = Counts(items=items, tokens=tokens, group=self.group, device=self.device)
        return args, self.counts.model_inputs(kwargs, device=self.device)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if self.paused or calls_are_own():
            return output
        counts, loss = self.counts, find_loss(output)
        if loss is not None:  # only the loss is weighted: the other outputs are what it was computed from
            share = 1.0 if counts.counted else counts.share()  # a counted loss is already its share
            (value,) = _sum([loss.item() * share], group=self.group, device=self.device)
            output = replace_loss(output, _GlobalLoss.apply(loss, value, share, self.watchdog))
        elif torch.is_grad_enabled():
            output = map_tensors(output, lambda tensor: self._weighted(tensor, counts.share()))
        if self.watchdog is not None:
            self.watchdog.leave()
        return output

    def _weighted(self, tensor: torch.Tensor, share: float) -> torch.Tensor:
        """An alias of an output the user computes a loss from, whose gradient is weighted by ``share``. The
        gradient reaching the tensor through another output (logits made from returned features) is that
        output's, weighted there: every path once."""

        def weight(grad: torch.Tensor) -> torch.Tensor:
            if self.watchdog is not None and self.watchdog.phase is None:
                watch_backward(self.watchdog)
            return grad * share

        if not tensor.requires_grad or getattr(tensor, "onegpu_global_rows", False):  # gathered: global already
            return tensor
        alias = tensor.view_as(tensor)
        alias.register_hook(weight)
        return alias


def _sum(values: list[float], *, group, device: torch.device) -> list[float]:
    if group is None:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


class MicroBatchLoss:
    """A pipeline's loss function: each micro-batch's share of the global-batch loss (the rule above, per
    micro-batch). ``loss_fn(output, target)``: the user's, for a model that does not compute its loss;
    ``count_items``: as for :class:`GlobalBatchHooks`, counted per micro-batch.

    The schedule cuts the target along with the inputs; the one it is given is the batch's row numbers, so
    that each call knows its micro-batch's rows (the user's target is taken at them)."""

    def __init__(
        self, model: nn.Module, *, group=None, loss_fn: Callable | None = None, count_items=None, microbatches: int = 1
    ) -> None:
        self.model, self.group, self.loss_fn = model, group, loss_fn
        self.count_items, self.microbatches = count_items, microbatches
        self.counts: Counts | None = None
        self.samples, self.target = 0, None
        self.items: list[int] = []  # per micro-batch, with count_items

    def inputs(
        self, inputs: dict[str, Any], target: Any = None, *, call: tuple[tuple, dict] = ((), {})
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """The model's inputs for the schedule, and the target it cuts along with them (the rows).
        ``call``: the model's call as given, for ``count_items``."""
        if self.loss_fn is not None and target is None:
            raise UsageError("prepare() was given a loss_fn: call the model as model(inputs, target=...)")
        first = next(v for v in inputs.values() if torch.is_tensor(v) and v.dim() > 0)
        self.samples = samples = first.shape[0]
        if target is not None and (not torch.is_tensor(target) or target.dim() == 0 or len(target) != samples):
            raise UsageError(f"target must be a tensor with one row per sample ({samples}), like the inputs")
        self.target, self.items = target, []
        if self.count_items is not None and samples % self.microbatches == 0:
            step = samples // self.microbatches
            for start in range(0, samples, step):
                args, kwargs = slice_batch(call, start, start + step)
                self.items.append(items_in(self.count_items, args, kwargs))
            items, tokens = sum(self.items), None
        else:
            items, tokens = samples, counted_label_tokens(self.model, inputs)
        self.counts = Counts(items=items, tokens=tokens, group=self.group, device=first.device)
        inputs = self.counts.model_inputs(inputs, device=first.device)
        return inputs, torch.arange(samples, device=first.device)

    def __call__(self, output: Any, rows: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            output = self.loss_fn(output, self.target.index_select(0, rows))
        if self.counts.counted:
            return output
        if self.count_items is None:
            return output * self.counts.share(len(rows))
        return output * self.counts.share(self.items[int(rows[0]) * self.microbatches // self.samples])
