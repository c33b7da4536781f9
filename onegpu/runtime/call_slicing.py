"""Batches that do not come from a DataLoader: ``X, Y = get_batch()``, tensors built in the loop, the user's own
iterator. Every worker draws the same global batch, and each computes only its replica's rows of it.

- ``share_random_state``: at ``prepare`` every worker takes rank 0's random state (torch's CPU and device
  generators, Python's ``random``, NumPy's), so ``torch.randint`` in ``get_batch`` draws the same offsets on
  every worker;
- ``CallSlicer``: when the model is called, the inputs whose leading size is the batch's are cut to this
  replica's rows (:func:`onegpu.runtime.data.slice_bounds`, the DataLoader's split). Batches a
  ``GlobalBatchLoader`` yielded (or views of them, or tensors of as many rows as its last slice) are
  sliced already and left alone: a batch left whole costs time only (each worker's loss is weighted by
  its rows), a slice sliced again would be wrong. A cheap fingerprint of the global batch (its size,
  element count and the sums of its first and last rows), one small all-gather per call, stops a job
  whose workers drew different batches;
- a call that carries a key-value cache object (``generate``'s calls: ``cache=`` / ``past_key_values=`` a
  Hugging Face ``Cache``) runs whole on every replica, without the fingerprint: a decoding step is bound by
  reading the weights, not by its rows, so slicing it would save little and cost two collectives per token
  (the fingerprint, the gather of the logits), and the cache would hold a slice only its replica could use.
  A call under ``torch.no_grad()`` with fewer rows than replicas runs whole too. A 1-D tensor that indexes
  positions (``cache_position``) is never cut as rows, whatever its length;
- what the loop sees stays the one device's: a loss the model returns is the global-batch loss
  (:mod:`onegpu.runtime.loss_weighting`); an output without a loss is gathered back to the global batch's
  rows, so a loss computed outside the model from the loop's own (global) targets is the global loss. Its
  backward keeps only this replica's rows of the gradient: every worker computed the same global loss, so
  the replicas' gradient SUM is the one device's gradient;
- random numbers drawn inside the model (dropout) come from a stream of each replica's own, forked for the
  forward: slices do not share masks, and the shared stream the loop draws batches from is not advanced.
"""

from __future__ import annotations

import random
from contextlib import ExitStack
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from onegpu.batches import batch_size, map_tensors, tensors_in
from onegpu.errors import UsageError
from onegpu.launch.process_group import Worker
from onegpu.outputs import find_loss
from onegpu.runtime.data import SLICED, slice_bounds
from onegpu.runtime.own_share import calls_are_own
from onegpu.runtime.watchdog import Watchdog

DIFFERENT_BATCHES = (
    "worker {rank}'s batch differs from worker 0's: every worker must draw the same global batch (onegpu slices "
    "it): draw batches from torch's RNG after onegpu.prepare() without seeding per rank, or pass a DataLoader"
)


def share_random_state(worker: Worker) -> None:
    """Give every worker rank 0's random state: torch's (CPU and this worker's device), Python's, NumPy's."""
    if worker.world_size == 1:
        return
    state = [random_state(worker.device)]
    dist.broadcast_object_list(state, src=0, device=worker.device if worker.device.type != "cpu" else None)
    set_random_state(state[0], worker.device)


def random_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type != "cpu":
        state["device"] = torch.get_device_module(device).get_rng_state(device)
    try:
        import numpy
    except ImportError:
        return state
    state["numpy"] = numpy.random.get_state()
    return state


def set_random_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "device" in state:
        torch.get_device_module(device).set_rng_state(state["device"], device)
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])


class _GatherRows(torch.autograd.Function):
    """This replica's rows in, the global batch's rows out (the same on every worker); backward keeps this
    replica's rows of the gradient, unscaled."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, bounds: list[tuple[int, int]], index: int, group):
        ctx.bounds, ctx.index = bounds, index
        longest = max(end - start for start, end in bounds)
        padded = rows.new_zeros((longest, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in bounds]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[: end - start] for part, (start, end) in zip(parts, bounds)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start, end = ctx.bounds[ctx.index]
        return grad[start:end], None, None, None


class CallSlicer:
    """Cuts a global batch given to the model to this replica's rows (``replica`` of ``replicas`` over
    ``group``); ``Worker`` and ``seed`` (agreed by every worker) make each replica's random stream."""

    def __init__(self, *, replica: int, replicas: int, group, worker: Worker) -> None:
        self.replica, self.replicas, self.group, self.worker = replica, replicas, group, worker
        seed = torch.tensor(
            [random.Random().getrandbits(62) if worker.is_main else 0], dtype=torch.int64, device=worker.device
        )
        dist.broadcast(seed, src=0)  # from a fresh generator: no stream the loop draws from moves
        self.seed, self.calls = int(seed), 0
        self.forked: ExitStack | None = None
        self.paused = False

    def slice_call(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict, list | None]:
        """The call's inputs cut to this replica's rows, and every replica's bounds (None: not sliced here).
        Every worker takes the same decision: none slices when any sees a slice already."""
        if carries_cache(kwargs):
            return args, kwargs, None
        batched = {k: v for k, v in kwargs.items() if k not in POSITION_KEYWORDS}
        tensors = [t for t in tensors_in((args, batched)) if t.dim() > 0]
        if not tensors:
            return args, kwargs, None
        rows = batch_size(args, batched)
        if not self._all_draw_the_same_batch(tensors, rows):
            return args, kwargs, None
        if rows < self.replicas and not torch.is_grad_enabled():  # fewer rows than replicas: each computes all
            return args, kwargs, None
        bounds = [slice_bounds(rows, rank=r, world_size=self.replicas) for r in range(self.replicas)]
        start, end = bounds[self.replica]

        def cut(tensor: torch.Tensor) -> torch.Tensor:
            return tensor[start:end] if tensor.dim() > 0 and tensor.shape[0] == rows else tensor

        cut_kwargs = {k: v if k in POSITION_KEYWORDS else map_tensors(v, cut) for k, v in kwargs.items()}
        return map_tensors(args, cut), cut_kwargs, bounds

    def gather_output(self, output: Any, bounds: list[tuple[int, int]]) -> Any:
        """An output without a loss, with the global batch's rows (a loss is made global elsewhere)."""
        if find_loss(output) is not None:
            return output
        start, end = bounds[self.replica]

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.dim() == 0 or tensor.shape[0] != end - start:
                return tensor
            gathered = _GatherRows.apply(tensor, bounds, self.replica, self.group)
            gathered.onegpu_global_rows = True  # its gradient is the global loss's already: not weighted again
            return gathered

        return map_tensors(output, gather)

    def _all_draw_the_same_batch(self, tensors: list[torch.Tensor], rows: int) -> bool:
        """Whether every worker holds the same global batch (False: some hold a slice from a GlobalBatchLoader);
        a global batch that differs between workers stops the job."""
        mine = torch.cat(
            [torch.tensor([float(SLICED.holds(tensors))], dtype=torch.float64), fingerprint(tensors, rows)]
        )
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine.to(self.worker.device))
        if any(float(theirs[0]) for theirs in every):
            return False
        for rank, theirs in enumerate(every):
            if not torch.equal(theirs, every[0]):
                raise UsageError(DIFFERENT_BATCHES.format(rank=rank))
        return True

    def fork_random(self, module: nn.Module) -> None:
        """Random numbers drawn by this forward come from this replica's stream (training only)."""
        self.join_random()  # a forward that raised left its stream forked
        self.calls += 1
        if not (module.training and torch.is_grad_enabled()):
            return
        self.forked = ExitStack()
        device = self.worker.device
        devices = [] if device.type == "cpu" else [device.index or 0]
        self.forked.enter_context(torch.random.fork_rng(devices=devices, device_type=device.type))
        torch.manual_seed((self.seed + self.calls * 1_000_003 + self.replica) % 2**62)

    def join_random(self) -> None:
        if self.forked is not None:
            self.forked.close()
            self.forked = None


POSITION_KEYWORDS = frozenset({"cache_position"})  # a model's inputs that index positions, not rows


def carries_cache(kwargs: dict[str, Any]) -> bool:
    """Whether a call passes a key-value cache object (a Hugging Face ``Cache``: it knows its sequence length)."""
    return any(not torch.is_tensor(v) and callable(getattr(v, "get_seq_length", None)) for v in kwargs.values())


def fingerprint(tensors: list[torch.Tensor], rows: int) -> torch.Tensor:
    """A few float64 numbers that differ, in practice, between two different batches."""
    batched = [t for t in tensors if t.shape[0] == rows]
    first = sum(float(t[0].double().nan_to_num().sum()) * (i + 1) for i, t in enumerate(batched))
    last = sum(float(t[-1].double().nan_to_num().sum()) * (i + 1) for i, t in enumerate(batched))
    return torch.tensor([rows, len(batched), sum(t.numel() for t in batched), first, last], dtype=torch.float64)


def attach_call_slicing(model: nn.Module, slicer: CallSlicer, *, between: Any, watchdog: Watchdog | None) -> None:
    """Slice the model's calls: ``between()`` registers the hooks that must see the slice's inputs and the
    gathered output (loss weighting, which ends the watched "forward" phase this hook begins); the slicing
    input hook runs before them, the gathering output hook too."""
    pending: list[Any] = []

    def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if slicer.paused or calls_are_own():  # a micro-batch, or a call with the replica's own share
            return None
        if watchdog is not None:  # the fingerprint's all-gather waits for every worker
            watchdog.enter("forward")
        slicer.fork_random(module)
        try:
            args, kwargs, bounds = slicer.slice_call(args, kwargs)
        except UsageError:  # the loop may catch it: nothing stays forked or watched
            slicer.join_random()
            if watchdog is not None:
                watchdog.leave()
            raise
        pending.append(bounds)
        return args, kwargs

    def after(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if slicer.paused or calls_are_own():
            return output
        slicer.join_random()
        bounds = pending.pop() if pending else None
        return output if bounds is None else slicer.gather_output(output, bounds)

    model.register_forward_hook(after, with_kwargs=True)
    between()
    model.register_forward_pre_hook(before, with_kwargs=True, prepend=True)
