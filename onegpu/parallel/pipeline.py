"""Pipeline parallelism without rewriting or tracing the model: stages are ranges of its repeated blocks.

Each worker runs the model's own forward, with hooks: blocks outside its range pass their
input through untouched, the first block of its range takes the activation received from the
previous stage, and the last block of its range ends the forward and hands its output to the
next stage. Values the model computes around its blocks (embeddings, attention masks, rotary
position embeddings, skip connections) are recomputed by each stage from the micro-batch's own
inputs, so nothing but block activations crosses a cut. A parameter used on several stages
(tied embeddings, a skip connection's projection) has its gradients summed across them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.pipelining.microbatch import TensorChunkSpec, _Replicate

from onegpu.errors import UsageError
from onegpu.parallel.blocks import repeated_blocks

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def balanced_cuts(costs: list[float], *, stages: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[int]:
    """First block of stages 1..S-1, so that the costliest stage is as cheap as possible.

    ``costs`` are per-block costs; the first and last stages also carry ``first_extra``
    (embeddings) and ``last_extra`` (head and loss).
    """
    blocks = len(costs)
    if not 1 < stages <= blocks:
        raise UsageError(f"{stages} pipeline stages need a model of at least {stages} blocks; it has {blocks}")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)

    def stage_cost(start: int, end: int) -> float:
        return (
            prefix[end] - prefix[start] + (first_extra if start == 0 else 0.0) + (last_extra if end == blocks else 0.0)
        )

    # best[s][i]: the lowest possible worst-stage cost of cutting blocks[:i] into s stages
    inf = float("inf")
    best = [[inf] * (blocks + 1) for _ in range(stages + 1)]
    choice = [[0] * (blocks + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, blocks + 1):
            for j in range(s - 1, i):
                worst = max(best[s - 1][j], stage_cost(j, i))
                if worst < best[s][i]:
                    best[s][i], choice[s][i] = worst, j
    cuts, end = [], blocks
    for s in range(stages, 1, -1):
        end = choice[s][end]
        cuts.append(end)
    return sorted(cuts)


class _StageDone(Exception):
    def __init__(self, output: torch.Tensor) -> None:
        self.output = output


class BlockRangeStage(nn.Module):
    """Blocks ``[start, end)`` of ``model``, run through the model's own forward."""

    def __init__(self, model: nn.Module, *, start: int, end: int) -> None:
        super().__init__()
        self.model = model
        blocks = repeated_blocks(model)
        self.first, self.last = start == 0, end == len(blocks)
        self._received: torch.Tensor | None = None
        for index, block in enumerate(blocks):
            if not start <= index < end:
                block.forward = _passthrough  # instance attribute: only this worker's copy skips it
        if not self.first:
            blocks[start].register_forward_pre_hook(self._take_received, with_kwargs=True)
        if not self.last:
            blocks[end - 1].register_forward_hook(self._hand_over)

    def _take_received(self, module, args, kwargs):
        if args:
            return (self._received, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._received}

    def _hand_over(self, module, args, output):
        raise _StageDone(output[0] if isinstance(output, (tuple, list)) else output)

    def forward(self, *received: torch.Tensor, **inputs: Any):
        self._received = received[0] if received else None
        if hasattr(self.model, "config"):  # a KV cache would see only this stage's layers
            inputs = {**inputs, "use_cache": False}
        try:
            output = self.model(**inputs)
        except _StageDone as done:
            return done.output
        finally:
            self._received = None
        loss = getattr(output, "loss", None)
        if loss is None and torch.is_tensor(output) and output.dim() == 0:
            loss = output
        if loss is None:
            raise UsageError("under a pipeline plan the model must compute its loss (pass labels, or return the loss)")
        return loss


def _passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


def as_keywords(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional inputs named after the model's forward parameters."""
    if not args:
        return dict(kwargs)
    names = list(inspect.signature(model.forward).parameters)
    return {**dict(zip(names, args)), **kwargs}


@dataclass
class PipelineParts:
    stage: PipelineStage
    schedule: Any
    module: BlockRangeStage


def build(
    model: nn.Module,
    *,
    cuts: list[int],
    stage_index: int,
    num_stages: int,
    device: torch.device,
    group,
    schedule: str,
    microbatches: int,
    loss_fn: Callable,
    inputs: dict[str, Any],
) -> PipelineParts:
    """This worker's stage of ``model`` and the schedule that runs it; ``inputs`` shows the batch's keys."""
    if schedule not in SCHEDULES:
        raise UsageError(f"schedule {schedule!r} is not executable yet: use one of {', '.join(SCHEDULES)}")
    bounds = [0, *cuts, len(repeated_blocks(model))]
    module = BlockRangeStage(model, start=bounds[stage_index], end=bounds[stage_index + 1])
    stage = PipelineStage(module, stage_index, num_stages, device, group=group)
    spec = {k: TensorChunkSpec(0) if torch.is_tensor(v) and v.dim() > 0 else _Replicate() for k, v in inputs.items()}
    runner = SCHEDULES[schedule](
        stage, n_microbatches=microbatches, loss_fn=loss_fn, kwargs_chunk_spec=spec, scale_grads=False
    )
    return PipelineParts(stage=stage, schedule=runner, module=module)


def sum_shared_gradients(model: nn.Module, *, group=None) -> None:
    """Sum the gradients of parameters that several stages used (every stage holds every parameter)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    used = torch.tensor([float(p.grad is not None) for p in model.parameters()], device=grads[0].device)
    dist.all_reduce(used, group=group)
    for param, grad, users in zip(model.parameters(), grads, used.tolist()):
        if users > 1:
            dist.all_reduce(grad, group=group)
            param.grad = grad
