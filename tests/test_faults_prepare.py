"""What used to break in prepare() now works: frozen models evaluate, streams of batches are split, a Qwen2
whose config derives its layer types is planned; and what cannot work is refused at prepare, in one line."""

import json

import pytest
import torch
from conftest import run_onegpu
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import onegpu
from onegpu.errors import UsageError
from onegpu.launch.process_group import Worker
from onegpu.runtime.data import GlobalBatchLoader, fitting_batch_size, leading_size, slice_batch


def launch(tmp_path, mode: str, *, workers: int) -> dict:
    out = tmp_path / f"{mode}.json"
    result = run_onegpu(
        "run", "--workers", str(workers), "tests/scripts/faults_prepare.py", mode, str(out), timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def worker(rank: int, world: int) -> Worker:
    return Worker(rank=rank, world_size=world, local_rank=rank, local_world_size=world, device=torch.device("cpu"))


@pytest.mark.slow
def test_a_frozen_model_evaluates_on_every_worker_as_on_one_device(tmp_path):
    results = launch(tmp_path, "frozen", workers=3)
    for how in ("default", "fsdp", "advanced"):  # replicated without gradient sync, sharded, or as planned
        evaluation = results[how]
        for losses in evaluation["losses"]:
            assert losses == pytest.approx(evaluation["expected"], rel=1e-5)
    assert results["default"]["strategy"] == results["advanced"]["strategy"] == "ddp"


@pytest.mark.slow
def test_a_model_without_parameters_evaluates_as_on_one_device(tmp_path):
    evaluation = launch(tmp_path, "no-parameters", workers=2)["default"]
    for losses in evaluation["losses"]:
        assert losses == pytest.approx(evaluation["expected"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ready-batches", "streamed-samples"])
def test_a_stream_of_batches_is_split_among_the_workers(tmp_path, mode):
    results = launch(tmp_path, mode, workers=3)
    rows = results["rows"]  # per worker, per batch
    for index, batch in enumerate(results["batches"]):
        assert [row for worker_rows in rows for row in worker_rows[index]] == batch
        assert [len(worker_rows[index]) for worker_rows in rows] == [2, 2, 2]


@pytest.mark.slow
def test_advanced_parallelization_trains_a_qwen2_whose_config_derives_its_layer_types(tmp_path):
    results = launch(tmp_path, "qwen2-advanced", workers=2)
    first, second = results["losses"]
    assert first == second and len(first) == 2 and all(loss == loss for loss in first)  # the same global loss
    assert results["plan"].startswith("dp=2")


def test_preparing_two_models_in_one_process_is_fine():
    for _ in range(2):
        model = torch.nn.Linear(3, 1)
        assert onegpu.prepare(model) is model


def test_preparing_one_model_twice_says_so():
    model = torch.nn.Linear(3, 1)
    onegpu.prepare(model)
    with pytest.raises(UsageError, match=r"^this model was already prepared by onegpu.prepare\(\): call prepare once"):
        onegpu.prepare(model)


def test_a_prepared_loader_is_not_prepared_again():
    _, loader = onegpu.prepare(torch.nn.Linear(3, 1), DataLoader(TensorDataset(torch.randn(4, 3)), batch_size=2))
    with pytest.raises(UsageError, match=r"^this DataLoader was already prepared"):
        onegpu.prepare(torch.nn.Linear(3, 1), loader)


def test_collated_tuples_are_sliced_field_by_field():
    x, y = torch.arange(6).reshape(6, 1), torch.arange(6)
    batch = [x, y]  # what torch's collation makes of samples that are tuples
    assert leading_size(batch) == 6
    assert [t.tolist() for t in slice_batch(batch, 2, 4)] == [[[2], [3]], [2, 3]]
    texts = ["a", "b", "c"]  # a list of rows
    assert leading_size(texts) == 3 and slice_batch(texts, 1, 2) == ["b"]
    assert slice_batch({"ids": x, "texts": list("abcdef")}, 4, 6)["texts"] == ["e", "f"]


def test_a_last_batch_too_small_to_share_is_refused_unless_dropped():
    data = TensorDataset(torch.randn(16, 4))
    with pytest.raises(UsageError, match=r"pass drop_last=True to the DataLoader, or use e.g. batch_size=8$"):
        GlobalBatchLoader(DataLoader(data, batch_size=7), worker=worker(0, 3))
    dropped = GlobalBatchLoader(DataLoader(data, batch_size=7, drop_last=True), worker=worker(0, 3))
    assert len(dropped) == 2


@given(samples=st.integers(1, 500), batch=st.integers(1, 64), workers=st.integers(1, 16))
def test_the_suggested_batch_size_leaves_every_batch_enough_samples(samples, batch, workers):
    if samples < workers:
        return
    size = fitting_batch_size(samples, batch_size=batch, workers=workers)
    assert workers <= size <= samples and (samples % size == 0 or samples % size >= workers)
