"""Gradient accumulation inside the model's call: a plan's ``microbatches`` k > 1 without a pipeline.

``model(**batch)`` in training runs this replica's slice of the global batch as k micro-batches, each one's
forward then its backward, so that only one micro-batch's activations live at a time. Gradients are reduced
across replicas once per call, by the last micro-batch's backward (FSDP2's ``set_requires_gradient_sync``).
As under a pipeline (:mod:`onegpu.runtime.pipelined`), the call returns the global-batch loss, whose
``backward()`` only confirms the gradients made already, scaled as the loop scaled the loss
(``(loss / n).backward()`` over n calls, :mod:`onegpu.runtime.call_gradients`):

- each micro-batch's loss is its share of the global batch's (:mod:`onegpu.runtime.loss_weighting`): its samples
  or the user's ``count_items`` over the global batch's, and for Hugging Face token losses its tokens over the
  global batch's (``num_items_in_batch``); a slice k does not divide is cut into micro-batches of unequal sizes;
- the other outputs (logits) are the micro-batches' joined along the batch dimension, as values: a loss computed
  from them, or a term added to the returned loss, is refused by its backward with one line. A KV cache is not
  made (``use_cache=False`` for forwards that take it);
- a model returning no loss is refused (the loss computed outside the model cannot be split): ``loss_fn``;
- under ``torch.no_grad()`` or ``model.eval()`` the whole slice runs in one forward, as without micro-batches.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils._pytree import tree_map

from onegpu.batches import batch_size, map_tensors
from onegpu.errors import UsageError
from onegpu.outputs import find_loss, replace_loss
from onegpu.runtime.call_gradients import CHANGED_LOSS, CallGradients, ConfirmedLoss
from onegpu.runtime.call_slicing import CallSlicer
from onegpu.runtime.data import slice_bounds
from onegpu.runtime.loss_weighting import Counts, GlobalBatchHooks, counted_label_tokens, items_in
from onegpu.runtime.pipeline_outputs import joined
from onegpu.runtime.watchdog import Watchdog

NO_LOSS = (
    "the plan runs each call as {k} micro-batches, which needs the loss inside the model's call: pass "
    "onegpu.prepare(..., loss_fn=...) and call model(inputs, target=y), or plan microbatches=1"
)


class _ValuesOnly(torch.autograd.Function):
    """An output of a call whose backward ran already: its values; a backward through it is refused."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise UsageError(CHANGED_LOSS)


class MicroBatchedModule:
    """Put in front of the model's class (and of FSDP2's): a training call runs as micro-batches."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        calls: MicroBatchCalls = self.__dict__["onegpu_micro_batches"]
        if not (self.training and torch.is_grad_enabled()):
            calls.trained_last = False
            return super().__call__(*args, **kwargs)
        return calls.run(self, args, kwargs, call=super().__call__)


def run_as_micro_batches(model: nn.Module, **how: Any) -> MicroBatchCalls:
    """Make ``model``'s training calls run as micro-batches, in place (``how``: :class:`MicroBatchCalls`'s)."""
    calls = MicroBatchCalls(model, **how)
    cls = type(model)
    model.__class__ = type(f"MicroBatched{cls.__name__}", (MicroBatchedModule, cls), {})
    model.__dict__["onegpu_micro_batches"] = calls
    return calls


class MicroBatchCalls:
    """Runs a training call of ``model`` as ``microbatches`` micro-batches. ``group``: the data-parallel replicas
    (None: one); ``slicer``: cuts a global batch built in the loop to this replica's rows; ``weighting``: the hooks
    that weight a whole call's loss, paused for micro-batches (weighted here)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        microbatches: int,
        group,
        device: torch.device,
        slicer: CallSlicer | None,
        weighting: GlobalBatchHooks,
        watchdog: Watchdog | None,
        count_items: Callable | None,
    ) -> None:
        self.microbatches, self.group, self.device, self.slicer = microbatches, group, device, slicer
        self.weighting, self.watchdog, self.count_items = weighting, watchdog, count_items
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        parameters = [p for p in model.parameters() if p.requires_grad]
        self.gradients = CallGradients(parameters, mark=lambda: None)
        self.anchor = torch.zeros((), device=device, requires_grad=True)  # the returned tensors' autograd root
        self.no_cache = "use_cache" in inspect.signature(model.forward).parameters
        self.inside, self.trained_last = False, False
        for param in parameters:
            param.register_post_accumulate_grad_hook(self._check_inside)

    def run(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], *, call: Callable) -> Any:
        if self.watchdog is not None:  # collectives: the batch's fingerprint, counts, reductions, the loss
            self.watchdog.enter("micro-batches (forward and backward)")
        try:
            if self.slicer is not None:
                self.slicer.fork_random(model)
                args, kwargs, _ = self.slicer.slice_call(args, kwargs)
            return self._run(model, args, kwargs, call)
        finally:
            if self.slicer is not None:
                self.slicer.join_random()
            if self.watchdog is not None:
                self.watchdog.leave()

    def _run(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], call: Callable) -> Any:
        parts = self._split(args, kwargs)
        counts, items = self._counts(model, kwargs, parts)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        outputs: list[Any] = []
        self.gradients.start()
        self.inside, self.trained_last = True, True
        try:
            with self._hooks_paused():
                for index, (part_args, part_kwargs) in enumerate(parts):
                    self._sync(index == len(parts) - 1)
                    output = call(*part_args, **self._inputs(part_kwargs, counts))
                    loss = find_loss(output)
                    if loss is None:
                        raise UsageError(NO_LOSS.format(k=self.microbatches))
                    share = 1.0 if counts.counted else counts.share(items[index])  # counted: its share already
                    (loss * share).backward()
                    total += loss.detach().double() * share
                    outputs.append(tree_map(lambda v: v.detach() if torch.is_tensor(v) else v, output))
        finally:
            self.inside = False
            self._sync(True)
            self.gradients.finish()
        if self.group is not None:
            dist.all_reduce(total, group=self.group)
        return self._output(outputs, float(total))

    def _split(self, args: tuple, kwargs: dict[str, Any]) -> list[tuple[tuple, dict[str, Any]]]:
        """The slice's micro-batches: as many on every replica (the fewest rows any has, at most k)."""
        rows = batch_size(args, kwargs)
        count = torch.tensor([max(1, min(self.microbatches, rows))], device=self.device)
        if self.group is not None:
            dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.group)
        parts = []
        for start, end in (slice_bounds(rows, rank=i, world_size=int(count)) for i in range(int(count))):

            def cut(tensor: torch.Tensor, start: int = start, end: int = end) -> torch.Tensor:
                return tensor[start:end] if tensor.dim() > 0 and tensor.shape[0] == rows else tensor

            parts.append((map_tensors(args, cut), map_tensors(kwargs, cut)))
        return parts

    def _counts(self, model: nn.Module, kwargs: dict[str, Any], parts: list) -> tuple[Counts, list[int]]:
        """The global batch's counts, and the items of each micro-batch."""
        if self.count_items is not None:
            items, tokens = [items_in(self.count_items, a, kw) for a, kw in parts], None
        else:
            items, tokens = [batch_size(a, kw) for a, kw in parts], counted_label_tokens(model, kwargs)
        return Counts(items=sum(items), tokens=tokens, group=self.group, device=self.device), items

    def _inputs(self, kwargs: dict[str, Any], counts: Counts) -> dict[str, Any]:
        if self.no_cache and "use_cache" not in kwargs:
            kwargs = {**kwargs, "use_cache": False}
        return counts.model_inputs(kwargs, device=self.device)

    def _output(self, outputs: list[Any], value: float) -> Any:
        """The global loss in the output's loss place; the other tensors joined over micro-batches, values only."""
        loss = ConfirmedLoss.apply(self.anchor, value, self.gradients)
        if torch.is_tensor(outputs[0]):
            return loss
        output = tree_map(
            lambda v: _ValuesOnly.apply(self.anchor, v) if torch.is_tensor(v) and v.is_floating_point() else v,
            joined(outputs),
        )
        return replace_loss(output, loss)

    @contextlib.contextmanager
    def _hooks_paused(self):
        """The hooks that slice a call and weight its loss leave the micro-batches alone."""
        hooks = [h for h in (self.weighting, self.slicer) if h is not None]
        for owner in hooks:
            owner.paused = True
        try:
            yield
        finally:
            for owner in hooks:
                owner.paused = False

    def _sync(self, sync: bool) -> None:
        for unit in self.units:
            unit.set_requires_gradient_sync(sync, recurse=False)

    def _check_inside(self, param: torch.Tensor) -> None:
        if self.trained_last and not self.inside:
            raise UsageError(CHANGED_LOSS)
