"""The gradients of one pipelined call, kept apart from those of the calls before it.

Under a pipeline the model's call runs every micro-batch's backward itself; ``loss.backward()`` then only
confirms it. A loop that accumulates gradients calls the model k times before ``optimizer.step()``:

- each call's gradients are made apart (the earlier calls' are set aside while it runs), so the sum over
  the stages that share a parameter (tied embeddings) adds this call's gradients only, once;
- the loop scales the loss first, ``(loss / k).backward()``: the scale reaches the returned loss's
  backward, which scales this call's gradients before adding them to the earlier ones.

As on one device, the gradients then hold the sum of every call's scaled gradient. The same holds for a call
that runs its micro-batches' backward itself without a pipeline (:mod:`onegpu.runtime.micro_batches`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHANGED_LOSS = (
    "under a pipeline or micro-batches the backward runs inside the model's call: a loss changed after the forward "
    "(a term added) cannot be honoured; compute it inside the model, and call backward() on the returned loss, or a "
    "multiple of it"
)


class CallGradients:
    """This call's gradients of the stage's ``parameters`` and the earlier calls'; ``mark()`` marks the
    gradients again once replaced (:mod:`onegpu.runtime.stage_gradients`)."""

    def __init__(self, parameters: list[torch.nn.Parameter], *, mark: Callable[[], None]) -> None:
        self.parameters, self.mark = parameters, mark
        self.earlier: list[torch.Tensor | None] = []
        self.this_call: list[torch.Tensor | None] = []

    def start(self) -> None:
        """Before the call's backward: set the earlier calls' gradients aside."""
        self.earlier = [p.grad for p in self.parameters]
        for param in self.parameters:
            param.grad = None

    def finish(self) -> None:
        """After it (shared parameters summed): the gradients are the earlier calls' plus this call's."""
        self.this_call = [p.grad for p in self.parameters]
        self._combine(1.0)

    @torch.no_grad()
    def confirm(self, factor: float) -> None:
        """The loss's backward: the loop scaled the loss by ``factor``, so is this call's share of the gradients.
        Nothing of the call is kept after it (``zero_grad`` frees the gradients)."""
        if factor != 1.0 and self.this_call:
            self._combine(factor)
            self.mark()
        self.earlier, self.this_call = [], []

    @torch.no_grad()
    def _combine(self, factor: float) -> None:
        for param, earlier, mine in zip(self.parameters, self.earlier, self.this_call):
            if mine is not None and factor != 1.0:
                mine = mine * factor
            param.grad = earlier if mine is None else mine if earlier is None else earlier + mine


class ConfirmedLoss(torch.autograd.Function):
    """The global loss of a call that ran its backward already; its backward scales what the call added to the
    gradients by the loss's scale (a loss divided by the accumulation steps)."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, value: float, gradients: CallGradients):
        ctx.gradients = gradients
        return torch.full((), value, dtype=torch.float32, device=anchor.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.gradients.confirm(grad.item())
        return None, None, None
