"""Gradient accumulation in the user's loop: ``(loss / k).backward()`` k times, then ``optimizer.step()``.

Gradients are reduced across replicas at most once per optimizer step, and the step sees exactly one
device's accumulated gradient. onegpu counts the model's training calls between optimizer steps:

- until the first step it does not know k: every backward reduces, as without accumulation (so the
  first step's gradients are reduced ones even for ``clip_grad_norm_``);
- from the second step on, the k-th call's backward reduces while it runs (FSDP2's own overlapped path,
  ``set_requires_gradient_sync``; DDP's, whose reduction sums the whole accumulated gradient, so a gradient
  reduced already is first split into equal shares), the earlier ones only accumulate locally;
- a step after fewer calls (the last, partial accumulation of an epoch) reduces what accumulated
  as it begins; a step after more reduces on every call from the k-th on, and k becomes the longer count.

Reducing the sum of the local gradients once equals summing each backward's reduction: exact.
Gradients read between ``backward()`` and ``step()`` (``clip_grad_norm_``) are the reduced ones whenever the
accumulation is as long as the previous one; in a shorter one they are reduced only when the step begins.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from onegpu.parallel.replicated import is_replicated, reduce_gradients, split_reduced_gradients


class GradientAccumulation:
    """Decides, per training call of ``model`` (whose FSDP2 units, or DDP replica, reduce gradients), whether its
    backward reduces; ``optimizers``' steps end an accumulation."""

    def __init__(self, model: nn.Module, optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.replica = model if is_replicated(model) else None
        self.calls, self.per_step, self.syncing = 0, None, True
        self.reductions = 0  # reductions made outside backward (for tests and reports)
        model.register_forward_pre_hook(self._before_call, prepend=True)  # before DDP's reads the decision
        for optimizer in optimizers:
            optimizer.register_step_pre_hook(self._before_step)

    def _before_call(self, module: nn.Module, args: tuple) -> None:
        if not (torch.is_grad_enabled() and module.training):
            return
        self.calls += 1
        sync = self.per_step is None or self.calls >= self.per_step
        if self.replica is not None and sync and self.calls > 1 and self.syncing:
            split_reduced_gradients(self.replica)  # DDP sums the whole gradient again: count the reduced part once
        self._sync(sync)

    def _sync(self, sync: bool) -> None:
        if sync != self.syncing:
            for unit in self.units:
                unit.set_requires_gradient_sync(sync, recurse=False)
            if self.replica is not None:
                self.replica.set_requires_gradient_sync(sync)
            self.syncing = sync

    def _before_step(self, *_) -> None:
        if self.calls == 0:  # a second optimizer of the same model, or a step without backward
            return
        if not self.syncing:
            self._reduce_pending()
        self.per_step, self.calls = max(self.per_step or 0, self.calls), 0  # a shorter one: the last, partial

    def _reduce_pending(self) -> None:
        """Reduce the gradients accumulated without reduction, as the last backward would have (FSDP2 has no
        public call for this: its parameter groups' own post-backward, run with reduction on)."""
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        self._sync(True)
        if self.replica is not None:
            reduce_gradients(self.replica)
            self.reductions += 1
        for unit in self.units:
            for group in unit._get_fsdp_state()._fsdp_param_groups:
                if not any(p.unsharded_accumulated_grad is not None or _local_grad(p) for p in group.fsdp_params):
                    continue
                group.unshard()
                group.wait_for_unshard()
                group.post_backward()
                group.finalize_backward()
                group._training_state = TrainingState.IDLE
                self.reductions += 1


def _local_grad(fsdp_param) -> bool:
    unsharded = getattr(fsdp_param, "_unsharded_param", None)
    return unsharded is not None and unsharded.grad is not None
