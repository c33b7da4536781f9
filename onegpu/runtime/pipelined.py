"""A model run as a pipeline, behind the user's single-device loop.

``loss = model(**batch).loss`` runs the whole schedule (every micro-batch's forward and
backward) and returns the global-batch loss; ``loss.backward()`` only confirms the gradients the
pipeline already made. A loss changed before ``backward`` (a term added, a scale) cannot be
honoured and is reported.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from onegpu.errors import UsageError
from onegpu.parallel import pipeline as pp
from onegpu.runtime.global_batch import counted_label_tokens

CHANGED_LOSS = (
    "under a pipeline plan the backward runs inside the pipeline: a loss changed after the forward (a term added, "
    "a scale) cannot be honoured; compute it inside the model, and call backward() on the returned loss as it is"
)


class _PipelineLoss(torch.autograd.Function):
    """The global loss; its backward only checks that nothing was done to it."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, value: float):
        return torch.full((), value, dtype=torch.float32, device=anchor.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if grad.item() != 1.0:
            raise UsageError(CHANGED_LOSS)
        return None, None


class MicroBatchLoss:
    """Each micro-batch's share of the global-batch loss.

    Hugging Face token losses get the global token count as ``num_items_in_batch`` (their loss is
    then already a share); other models' mean losses are weighted by their number of samples.
    """

    def __init__(self, model: nn.Module, *, data_group=None) -> None:
        self.model, self.data_group = model, data_group
        self.samples, self.global_samples, self.counted = 1, 1, False

    def inputs(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
        """The model's inputs for the schedule, and a per-sample target that carries micro-batch sizes.

        Counts are summed over the data-parallel replicas: each pipeline's loss is its share of the
        global batch's.
        """
        first = next(v for v in inputs.values() if torch.is_tensor(v) and v.dim() > 0)
        self.samples = first.shape[0]
        count = counted_label_tokens(self.model, inputs)
        self.counted = count is not None
        totals = torch.tensor([float(count or 0), float(self.samples)], dtype=torch.float64, device=first.device)
        if self.data_group is not None:
            dist.all_reduce(totals, group=self.data_group)
        self.global_samples = int(totals[1])
        if self.counted:
            inputs = {**inputs, "num_items_in_batch": torch.tensor(int(totals[0]), device=first.device)}
        return inputs, torch.ones(self.samples, device=first.device)

    def __call__(self, loss: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        return loss if self.counted else loss * (samples.numel() / self.global_samples)


class PipelinedModel(nn.Module):
    """This worker's pipeline stage, called like the whole model."""

    def __init__(self, model: nn.Module, *, plan, worker, cuts: list[int], mesh) -> None:
        super().__init__()
        self.pipe_group = mesh["pp"].get_group()
        self.data_group = mesh["dp"].get_group() if plan.dp > 1 else None
        self.stage_index = mesh["pp"].get_local_rank()
        self.last_rank = dist.get_global_rank(self.pipe_group, plan.pp - 1)
        self.loss = MicroBatchLoss(model, data_group=self.data_group)
        self.plan, self.worker, self.cuts = plan, worker, cuts
        self.parts: pp.PipelineParts | None = None  # built at the first batch, which shows the inputs
        self.model = model
        self.anchor = nn.Parameter(torch.zeros((), device=worker.device))
        self._in_step = False
        self.used: set[str] = set()  # parameters this stage trains (its blocks, and what it shares)
        for param in model.parameters():
            param.register_post_accumulate_grad_hook(self._check_inside_step)

    def _check_inside_step(self, param: torch.Tensor) -> None:
        if not self._in_step:
            raise UsageError(CHANGED_LOSS)

    def parameters(self, recurse: bool = True):
        return self.model.parameters(recurse)

    def named_parameters(self, *args, **kwargs):
        return self.model.named_parameters(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            raise UsageError("inference under a pipeline plan is not supported yet: evaluate with a plan of pp=1")
        inputs, target = self.loss.inputs(pp.as_keywords(self.model, args, kwargs))
        if self.loss.samples % self.plan.microbatches:
            raise UsageError(
                f"a batch of {self.loss.samples} samples cannot be cut into {self.plan.microbatches} equal "
                f"micro-batches: use a batch size that is a multiple of {self.plan.microbatches} (drop_last=True)"
            )
        if self.parts is None:
            self.parts = pp.build(
                self.model,
                cuts=self.cuts,
                stage_index=self.stage_index,
                num_stages=self.plan.pp,
                device=self.worker.device,
                group=self.pipe_group,
                schedule=self.plan.schedule,
                microbatches=self.plan.microbatches,
                loss_fn=self.loss,
                inputs=inputs,
            )
        last = self.stage_index == self.plan.pp - 1
        losses: list[torch.Tensor] = []
        self._in_step = True
        try:
            if self.stage_index == 0:
                self.parts.schedule.step(**inputs, return_outputs=False)
            else:
                self.parts.schedule.step(
                    **inputs, target=target if last else None, losses=losses if last else None, return_outputs=False
                )
            pp.sum_shared_gradients(self.model, group=self.pipe_group)
            if self.data_group is not None:  # each replica's gradient is its share: sum them
                for param in self.model.parameters():
                    if param.grad is not None:
                        dist.all_reduce(param.grad, group=self.data_group)
            self.used |= {name for name, p in self.model.named_parameters() if p.grad is not None}
        finally:
            self._in_step = False
        total = torch.zeros((), dtype=torch.float64, device=self.anchor.device)
        if last:
            total += sum(loss.detach().double() for loss in losses)
        dist.broadcast(total, src=self.last_rank, group=self.pipe_group)
        if self.data_group is not None:
            dist.all_reduce(total, group=self.data_group)
        return SimpleNamespace(loss=_PipelineLoss.apply(self.anchor, float(total)))


def pipeline_state_dict(model: PipelinedModel) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0: each parameter from a stage that trains it; empty elsewhere."""
    own = {name: t.detach().cpu() for name, t in model.model.named_parameters() if name in model.used}
    gathered: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    if dist.get_rank() != 0:
        return {}
    state = {k: v.detach().cpu() for k, v in model.model.state_dict().items()}
    for part in gathered:
        state.update(part)
    return state
