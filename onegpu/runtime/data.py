"""The user's DataLoader yields the global batch; each worker loads only its slice of it."""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Sampler

from onegpu.batches import leading_size, move_to, slice_batch, tensors_in
from onegpu.errors import UsageError
from onegpu.launch.process_group import Worker


def slice_bounds(batch_size: int, *, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s slice; the first ``batch_size % world_size`` ranks get one more."""
    if batch_size < world_size:
        raise UsageError(
            f"a global batch of {batch_size} samples cannot be split among {world_size} workers: "
            f"use a batch size of at least {world_size}, fewer workers, or drop_last=True for a short last batch"
        )
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def sync_rng(generator: torch.Generator | None, *, worker: Worker) -> None:
    """Give every worker rank 0's random state, so all draw the same shuffle."""
    if worker.world_size == 1:
        return
    state = generator.get_state() if generator is not None else torch.get_rng_state()
    state = state.to(worker.device)
    dist.broadcast(state, src=0)
    state = state.cpu()
    if generator is not None:
        generator.set_state(state)
    else:
        torch.set_rng_state(state)


class SlicedBatchSampler(Sampler[list[int]]):
    """Yields this worker's slice of each global batch of indices drawn by the user's batch sampler."""

    def __init__(
        self, batch_sampler: Any, *, worker: Worker, shard: tuple[int, int], position: LoaderPosition, drawn=None
    ) -> None:
        self.batch_sampler, self.worker, self.shard, self.position = batch_sampler, worker, shard, position
        self.drawn = drawn  # told each global batch's rows (its _global_rows)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        generator = getattr(getattr(self.batch_sampler, "sampler", None), "generator", None)
        sync_rng(generator, worker=self.worker)
        rank, size = self.shard
        for indices in self.position.epoch(iter(self.batch_sampler), generator):
            indices = list(indices)
            if self.drawn is not None:
                self.drawn._global_rows = len(indices)
            start, end = slice_bounds(len(indices), rank=rank, world_size=size)
            yield indices[start:end]


def check_last_batch(loader: DataLoader, *, workers: int) -> None:
    """Refuse now a last batch too small to share, rather than after an epoch of work."""
    if loader.batch_size is None or loader.drop_last:
        return
    try:
        samples = len(loader.dataset) if isinstance(loader.dataset, IterableDataset) else len(loader.sampler)
    except TypeError:  # a stream of unknown length
        return
    last = samples % loader.batch_size
    if 0 < samples < workers:
        raise UsageError(
            f"the DataLoader yields {samples} samples, fewer than the {workers} workers: "
            f"run with --workers {samples}, or give it more samples"
        )
    if 0 < last < workers:
        raise UsageError(
            f"the last batch holds {last} of {samples} samples in batches of {loader.batch_size}, fewer than the "
            f"{workers} workers: pass drop_last=True to the DataLoader, or use e.g. batch_size="
            f"{fitting_batch_size(samples, batch_size=loader.batch_size, workers=workers)}"
        )


def fitting_batch_size(samples: int, *, batch_size: int, workers: int) -> int:
    """The batch size nearest ``batch_size`` (the larger on a tie) whose every batch has at least ``workers``
    samples; ``samples`` itself, one batch, always does."""
    for distance in range(1, samples):
        for size in (batch_size + distance, batch_size - distance):
            if workers <= size <= samples and (samples % size == 0 or samples % size >= workers):
                return size
    return samples


def check_loader(loader: DataLoader, *, replicas: int) -> None:
    """Fail now, not at the first batch or the last, when the loader's batches cannot be shared by ``replicas``."""
    if loader.batch_size is not None:
        slice_bounds(loader.batch_size, rank=0, world_size=replicas)
        check_last_batch(loader, workers=replicas)


def first_samples(loader: DataLoader, count: int) -> Any | None:
    """The first ``count`` samples of a map-style loader's dataset, collated (no RNG drawn, no loader iterated)."""
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return None
    return loader.collate_fn([loader.dataset[i] for i in range(min(len(loader.dataset), count))])


class SlicedBatches:
    """The tensors GlobalBatchLoaders yielded lately (held weakly, by storage): a model called on them, or on views
    of them, is given a slice already and is not sliced again."""

    def __init__(self, *, keep: int = 256) -> None:
        self.keep, self.storages = keep, OrderedDict()
        self.rows: int | None = None  # the last slice's: a batch of as many rows made from it is a slice too

    def mark(self, batch: Any) -> None:
        self.rows = leading_size(batch)
        for tensor in tensors_in(batch):
            pointer = tensor.untyped_storage().data_ptr()
            if pointer:
                self.storages[pointer] = weakref.ref(tensor)
                self.storages.move_to_end(pointer)
        while len(self.storages) > self.keep:
            self.storages.popitem(last=False)

    def holds(self, tensors: list[torch.Tensor]) -> bool:
        """Whether ``tensors`` are a slice already: one shares its storage with a tensor a GlobalBatchLoader yielded
        and still alive, or they have as many rows as its last slice (``x.float()`` made of it). Not slicing a
        global batch costs time only (each worker's loss is weighted by its rows: exact); slicing twice would not."""
        if self.rows is not None and tensors and tensors[0].shape[0] == self.rows:
            return True
        for tensor in tensors:
            ref = self.storages.get(tensor.untyped_storage().data_ptr())
            if ref is not None and ref() is not None:
                return True
        return False


SLICED = SlicedBatches()


_AT_NEXT_BATCH: list[Callable[[], None]] = []
_END = object()


def at_next_batch(action: Callable[[], None]) -> None:
    """Run ``action`` once, when the loop next asks a prepared loader for a batch, before any is drawn: between
    two steps, after everything the loop did in the first (a scheduler's step, its logging, its own save)."""
    _AT_NEXT_BATCH.append(action)


def _next_batch_asked() -> None:
    while _AT_NEXT_BATCH:
        _AT_NEXT_BATCH.pop(0)()


class LoaderWaits:
    """How long the loop waited on prepared loaders for batches (seconds, summed until taken), and the rows of
    the global batch last yielded (for the job's metrics, ``runtime/step_metrics.py``)."""

    def __init__(self) -> None:
        self.seconds, self.last_s, self.global_rows = 0.0, 0.0, None

    def waited(self, seconds: float, *, global_rows: int | None) -> None:
        self.seconds += seconds
        self.last_s, self.global_rows = seconds, global_rows

    def take_rows(self) -> int | None:
        """The rows of the global batch yielded last, once (None: no prepared loader yielded since)."""
        rows, self.global_rows = self.global_rows, None
        return rows

    def take_seconds(self) -> float:
        """The seconds waited since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


WAITS = LoaderWaits()


class LoaderPosition:
    """Where a loader is: its epoch (counted from 0), the global batches of that epoch the loop has taken, and
    the random state its sampler drew the epoch's order from. A state restored (:meth:`resume_at`) makes the
    next epoch the rest of the saved one: the same order drawn again, the batches taken skipped unloaded."""

    def __init__(self) -> None:
        self.epochs, self.batches, self.start_state = 0, 0, None
        self.resume: dict[str, Any] | None = None

    def epoch(self, batches: Iterator[Any], generator: torch.Generator | None) -> Iterator[Any]:
        """``batches`` of a new epoch (of the saved one when resuming), counting from where it resumes."""
        resume, self.resume = self.resume, None
        if resume is None or resume["start_state"] is None:  # a fresh epoch (a state saved before any)
            self.epochs += 1 if self.start_state is not None else 0
            self.start_state, self.batches = _get_state(generator), 0
            return batches
        _set_state(generator, resume["start_state"])  # the saved epoch's order, drawn again
        self.epochs, self.start_state, self.batches = resume["epochs"], resume["start_state"], 0
        for _ in range(resume["batches"]):
            if next(batches, None) is None:
                break
            self.batches += 1
        _set_state(generator, resume["state"])  # where the saved run was: the rest of its draws follow
        return batches

    def taken(self) -> None:
        self.batches += 1

    def state(self, generator: torch.Generator | None, *, batch_size: int | None) -> dict[str, Any]:
        return {"epochs": self.epochs, "batches": self.batches, "start_state": self.start_state,
                "state": _get_state(generator), "batch_size": batch_size,
                "samples": self.batches * (batch_size or 1)}  # fmt: skip

    def resume_at(self, state: dict[str, Any], generator: torch.Generator | None) -> None:
        self.resume, self.epochs, self.batches = state, state["epochs"], state["batches"]
        _set_state(generator, state["state"])


def _get_state(generator: torch.Generator | None) -> torch.Tensor:
    return generator.get_state() if generator is not None else torch.get_rng_state()


def _set_state(generator: torch.Generator | None, state: torch.Tensor) -> None:
    if generator is not None:
        generator.set_state(state)
    else:
        torch.set_rng_state(state)


class GlobalBatchLoader(DataLoader):
    """The user's DataLoader, yielding this worker's slice of every global batch on its device.

    ``shard`` is (index, count) among the data-parallel replicas; by default every worker is one.
    """

    def __init__(self, loader: DataLoader, *, worker: Worker, shard: tuple[int, int] | None = None) -> None:
        self.worker, self.original = worker, loader
        self.shard = shard or (worker.rank, worker.world_size)
        self.slices_indices = loader.batch_sampler is not None and not isinstance(loader.dataset, IterableDataset)
        self.position = LoaderPosition()
        self._global_rows: int | None = None  # of the batch last drawn, before slicing
        check_loader(loader, replicas=self.shard[1])
        if self.slices_indices:
            super().__init__(
                loader.dataset,
                batch_sampler=SlicedBatchSampler(
                    loader.batch_sampler, worker=worker, shard=self.shard, position=self.position, drawn=self
                ),
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                pin_memory=loader.pin_memory,
                timeout=loader.timeout,
                worker_init_fn=loader.worker_init_fn,
                multiprocessing_context=loader.multiprocessing_context,
                generator=loader.generator,
                prefetch_factor=loader.prefetch_factor,
                persistent_workers=loader.persistent_workers,
            )
        else:
            super().__init__(loader.dataset, batch_size=None)

    def __len__(self) -> int:
        return len(self.original)

    def __iter__(self) -> Iterator[Any]:
        _next_batch_asked()
        batches = super().__iter__() if self.slices_indices else self._sliced(iter(self.original))
        while True:
            started = time.perf_counter()
            batch = next(batches, _END)
            if batch is _END:
                return
            batch = move_to(batch, self.worker.device)
            WAITS.waited(time.perf_counter() - started, global_rows=self._global_rows)
            SLICED.mark(batch)
            self.position.taken()
            yield batch
            _next_batch_asked()

    def batch_size_global(self) -> int | None:
        """The user's loader's batch size: the global batch, whatever the workers."""
        return self.original.batch_size

    def order_generator(self) -> torch.Generator | None:
        """The generator the user's sampler draws the order from (None: torch's default one)."""
        if self.slices_indices:
            return getattr(getattr(self.original.batch_sampler, "sampler", None), "generator", None)
        return self.original.generator

    def _sliced(self, batches: Iterator[Any]) -> Iterator[Any]:
        sync_rng(self.original.generator, worker=self.worker)
        for batch in self.position.epoch(batches, self.original.generator):
            self._global_rows = leading_size(batch)
            start, end = slice_bounds(self._global_rows, rank=self.shard[0], world_size=self.shard[1])
            yield slice_batch(batch, start, end)
