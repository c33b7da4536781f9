"""Each worker gets a contiguous slice of the global batch; slices cover it exactly, sizes differ by at most one."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from onegpu.errors import UsageError
from onegpu.launch.process_group import Worker
from onegpu.runtime.data import GlobalBatchLoader, slice_bounds


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    """These workers are pretend ones: there are no peers to share a random state with."""
    monkeypatch.setattr("onegpu.runtime.data.sync_rng", lambda generator, *, worker: None)


def worker(rank: int, world: int) -> Worker:
    return Worker(rank=rank, world_size=world, local_rank=rank, local_world_size=world, device=torch.device("cpu"))


@given(world=st.integers(1, 16), extra=st.integers(0, 100))
def test_slices_cover_the_batch_evenly(world, extra):
    batch = world + extra
    bounds = [slice_bounds(batch, rank=r, world_size=world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == batch
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_a_batch_smaller_than_the_workers_names_the_fix():
    with pytest.raises(
        UsageError, match="batch of 2 samples cannot be split among 3 workers: use a batch size of at least 3"
    ):
        slice_bounds(2, rank=0, world_size=3)


def test_each_worker_loads_only_its_indices():
    data = TensorDataset(torch.arange(10))
    loader = DataLoader(data, batch_size=5)
    seen = [[batch[0].tolist() for batch in GlobalBatchLoader(loader, worker=worker(r, 2))] for r in range(2)]
    assert seen == [[[0, 1, 2], [5, 6, 7]], [[3, 4], [8, 9]]]
    assert len(GlobalBatchLoader(loader, worker=worker(0, 2))) == len(loader) == 2


def test_iterable_datasets_are_sliced_after_collation():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from ({"x": torch.tensor(i)} for i in range(6))

    loader = DataLoader(Stream(), batch_size=3)
    seen = [[b["x"].tolist() for b in GlobalBatchLoader(loader, worker=worker(r, 2))] for r in range(2)]
    assert seen == [[[0, 1], [3, 4]], [[2], [5]]]
