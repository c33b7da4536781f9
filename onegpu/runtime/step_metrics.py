"""What each optimizer step of a job of ``onegpu run`` did, measured on rank 0 alone and written by it
(``runtime/metrics_log.py``): one row per step with torchtitan's metric names.

- ``loss_metrics/global_avg_loss``: the loss the model returned (already the global batch's on every worker),
  averaged over the training calls of the step (several when the loop accumulates gradients); left out when the
  model returns no loss (a loss computed in the loop from its outputs: give ``loss_fn`` to ``prepare``);
- ``grad_norm``: what ``torch.nn.utils.clip_grad_norm_`` returned in the step, when the loop clips;
- ``throughput(tps)``: tokens of the global batches per second (token ids: ``input_ids``, or the first integer
  tensor of two or more dimensions), else ``throughput(sps)``, samples per second;
- ``time_metrics/end_to_end(s)``: wall time from the previous step's end (the first step: from its first batch);
- ``time_metrics/data_loading(s)``/``(%)``: time the loop waited on prepared DataLoaders (0 for a loop that builds
  its batches itself: onegpu cannot tell its batch building from the rest of its work);
- ``tflops``, ``mfu(%)``: per worker, from the model FLOPs and device peak of the plan's prediction (plans the
  planner searched); other plans have ``tflops`` from the FLOPs the model's inspection counted and no ``mfu(%)``
  (no device peak), and neither when the model was not inspected (a fitted plan given as JSON);
- ``memory/peak_per_worker(GiB)``, ``memory/max_active(GiB)``: each worker's peak (the device's on an accelerator,
  the process's resident memory on CPU), as the workers last reported it (``launch/status.py``), and its maximum.

Rank 0 adds no collective: every figure is its own or read from the peers' status files.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from onegpu.batches import tensors_in
from onegpu.launch.clip_norms import take_norm
from onegpu.launch.process_group import Worker
from onegpu.launch.status import attempt_directory, last_memory
from onegpu.outputs import find_loss
from onegpu.plan import Plan
from onegpu.runtime.data import WAITS
from onegpu.settings import settings

GIB = 2**30
MEMORY_READ_EVERY_S = 2.0  # the workers report their memory every 2 s (launch/reporting.py)


def metrics_row(
    *,
    step: int,
    at: float,
    losses: list[float],
    grad_norm: float | None,
    items: int,
    tokens: bool,
    seconds: float,
    loading_s: float,
    flops_per_item: float | None = None,
    peak_flops: float | None = None,
    world_size: int = 1,
    peaks: list[float | None] = (),
) -> dict[str, Any]:
    """One step's row: what was measured, in torchtitan's names (see the module's docstring)."""
    seconds = max(seconds, 1e-9)
    row: dict[str, Any] = {"step": step, "time": at}
    if losses:
        row["loss_metrics/global_avg_loss"] = sum(losses) / len(losses)
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    row["throughput(tps)" if tokens else "throughput(sps)"] = items / seconds
    row["time_metrics/end_to_end(s)"] = seconds
    row["time_metrics/data_loading(s)"] = loading_s
    row["time_metrics/data_loading(%)"] = 100 * min(loading_s, seconds) / seconds
    if flops_per_item is not None:
        tflops = flops_per_item * items / seconds / world_size / 1e12
        row["tflops"] = tflops
        if peak_flops:
            row["mfu(%)"] = 100 * tflops * 1e12 / peak_flops
    known = [p for p in peaks if p is not None]
    if known:
        row["memory/max_active(GiB)"] = max(known) / GIB
        row["memory/peak_per_worker(GiB)"] = [None if p is None else p / GIB for p in peaks]
    return row


def flops_of(plan: Plan) -> tuple[float | None, float | None]:
    """Model FLOPs per token (per sample for models without tokens) and one device's peak FLOP/s, from the plan's
    prediction; (None, None) without one."""
    p = plan.predicted
    if p is None or p.step_time_s <= 0 or p.tokens_per_s <= 0:
        return None, None
    model_flops = p.tflops_per_device * 1e12 * p.step_time_s * plan.world_size
    peak = p.tflops_per_device * 1e12 / p.mfu if p.mfu > 0 else None
    return model_flops / (p.tokens_per_s * p.step_time_s), peak


def tokens_per_row(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The tokens of one sample of a call of token ids (``input_ids``, else the first integer tensor of two or
    more dimensions), or None for a call of other inputs."""
    ids = kwargs.get("input_ids")
    candidates = [ids] if torch.is_tensor(ids) else tensors_in((args, kwargs))
    for tensor in candidates:
        if tensor.dim() >= 2 and not tensor.is_floating_point() and not tensor.is_complex():
            if tensor.dtype is not torch.bool:
                return int(tensor.shape[1])
    return None


class PeerMemory:
    """Each worker's peak memory as it last reported it, read at most every 2 s."""

    def __init__(self, *, world_size: int) -> None:
        self.world_size, self.read_at, self.peaks = world_size, -MEMORY_READ_EVERY_S, [None] * world_size

    def peaks_bytes(self) -> list[float | None]:
        now = time.monotonic()
        status = settings().status_dir
        if status is not None and now - self.read_at >= MEMORY_READ_EVERY_S:
            self.read_at = now
            directory = attempt_directory(status, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
            for rank in range(self.world_size):
                memory = last_memory(directory, rank)
                if memory is not None:
                    peak = memory.device_peak if memory.device_peak is not None else memory.peak
                    self.peaks[rank] = max(self.peaks[rank] or 0.0, peak)
        return list(self.peaks)


def _rows(args: tuple, kwargs: dict[str, Any]) -> int:
    """The samples of a call (the leading size of its first batched tensor, wherever it is), 0 when none is."""
    return next((int(t.shape[0]) for t in tensors_in((args, kwargs)) if t.dim() > 0), 0)


def _never_fails(hook):
    """A hook of the meter whose failure (a full disk, an output it cannot read) stops the metrics, not the job."""

    @functools.wraps(hook)
    def guarded(self, *args: Any) -> Any:
        try:
            return hook(self, *args)
        except Exception as error:  # noqa: BLE001 - the training goes on without its metrics
            if _current[0] is self:
                _current[0] = None
                print(f"onegpu: metrics stopped: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            return None

    return guarded


class StepMeter:
    """Rank 0's hooks on the model's training calls and the last optimizer's step: each step's row, to ``log``.
    Only the meter of the last ``prepare`` measures (a script may prepare several models in turn)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        plan: Plan,
        worker: Worker,
        log,
        flops_per_item=None,
    ) -> None:
        self.model, self.log, self.world_size = model, log, worker.world_size
        self.flops_per_item, self.peak_flops = flops_of(plan)
        if self.flops_per_item is None:  # counted by the inspection, without a device's peak: TFLOPs, no MFU
            self.flops_per_item = flops_per_item
        self.memory = PeerMemory(world_size=worker.world_size)
        self.started: float | None = None  # the step's start; None before its first training call
        self.losses: list[torch.Tensor] = []
        self.rows, self.tokens = 0, 0  # of the step's training calls; tokens None once a call has none
        _current[0] = self
        take_norm()  # a norm clipped before this prepare is not a step's, nor a batch a loader yielded before it
        WAITS.take_rows(), WAITS.take_seconds()
        model.register_forward_pre_hook(self._before_call, with_kwargs=True, prepend=True)
        model.register_forward_hook(self._after_call)
        optimizer.register_step_post_hook(self._after_step)

    def _training(self) -> bool:
        return _current[0] is self and torch.is_grad_enabled() and self.model.training

    @_never_fails
    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self._training():
            return
        rows = WAITS.take_rows()  # a prepared loader's global batch; else the loop's own, not sliced yet
        if self.started is None:  # the first step: from its first batch's loading (earlier waits are not its own)
            loading = WAITS.last_s if rows is not None else 0.0
            self.started = time.perf_counter() - loading
            WAITS.take_seconds()
            WAITS.seconds = loading
        rows = rows if rows is not None else _rows(args, kwargs)
        per_row = tokens_per_row(args, kwargs)
        self.rows += rows
        self.tokens = None if self.tokens is None or per_row is None else self.tokens + rows * per_row

    @_never_fails
    def _after_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._training():
            loss = find_loss(output)
            if loss is not None:
                self.losses.append(loss.detach())

    @_never_fails
    def _after_step(self, *_: Any) -> None:
        if _current[0] is not self or self.started is None:
            return
        now = time.perf_counter()
        from onegpu.runtime.prepared import _prepared

        row = metrics_row(
            step=_prepared.optimizer_steps[0] if _prepared is not None else 0,
            at=time.time(),
            losses=[float(loss) for loss in self.losses],
            grad_norm=take_norm(),
            items=self.rows if self.tokens is None else self.tokens,
            tokens=self.tokens is not None,
            seconds=now - self.started,
            loading_s=WAITS.take_seconds(),
            flops_per_item=self.flops_per_item,
            peak_flops=self.peak_flops,
            world_size=self.world_size,
            peaks=self.memory.peaks_bytes(),
        )
        self.losses, self.rows, self.tokens, self.started = [], 0, 0, now
        self.log.write(row)


_current: list[StepMeter | None] = [None]
