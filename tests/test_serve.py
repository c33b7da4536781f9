"""Batch inference across replicas: ``onegpu.split_between_replicas`` gives each replica its share of a list,
its model calls inside are its own, and ``onegpu.gather_object`` brings every replica's results back in order."""

import pytest
import torch
from conftest import launch_script

import onegpu
from onegpu.errors import UsageError
from onegpu.launch.process_group import Worker
from onegpu.plan import Plan
from onegpu.runtime.own_share import calls_are_own
from onegpu.runtime.replicas import Replicas, replicas_of, share_bounds


def worker(rank: int, world_size: int) -> Worker:
    return Worker(
        rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size, device=torch.device("cpu")
    )


def test_shares_are_contiguous_and_the_first_replicas_take_one_more():
    assert [share_bounds(7, index=i, count=2) for i in range(2)] == [(0, 4), (4, 7)]
    assert [share_bounds(7, index=i, count=3) for i in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [share_bounds(1, index=i, count=3) for i in range(3)] == [(0, 1), (1, 1), (1, 1)]  # two replicas idle
    assert [share_bounds(0, index=i, count=2) for i in range(2)] == [(0, 0), (0, 0)]


def test_replicas_are_the_model_copies_that_compute_alone():
    assert replicas_of(Plan(dp=4), worker=worker(2, 4)) == Replicas(index=2, count=4, size=1)
    # a tensor-parallel pair is one replica: its two workers hold one share
    assert replicas_of(Plan(dp=2, tp=2), worker=worker(3, 4)) == Replicas(index=1, count=2, size=2)
    assert replicas_of(Plan(dp=2, sharding="optimizer"), worker=worker(1, 2)) == Replicas(index=1, count=2, size=1)
    # a forward that gathers parameters, or a pipeline, needs every worker: one replica
    for plan in (
        Plan(dp=2, sharding="parameters"),
        Plan(dp=2, sharding="gradients"),
        Plan(dp=1, pp=2, schedule="gpipe"),
    ):
        assert replicas_of(plan, worker=worker(1, 2)) == Replicas(index=0, count=1, size=2)
    assert replicas_of(None, worker=worker(1, 3)) == Replicas(index=1, count=3, size=1)  # nothing prepared yet


def test_in_one_process_the_split_is_everything_and_the_gather_gives_it_back():
    prompts = ["a", "bb", "ccc"]
    with onegpu.split_between_replicas(prompts) as mine:
        assert mine == prompts
        assert calls_are_own()
    assert not calls_are_own()
    assert onegpu.gather_object(mine) == prompts  # a list: joined
    assert onegpu.gather_object({"n": 3}) == [{"n": 3}]  # anything else: one entry per replica
    with onegpu.split_between_replicas({"ids": torch.arange(4), "names": list("abcd")}) as mine:
        assert torch.equal(mine["ids"], torch.arange(4)) and mine["names"] == list("abcd")


@pytest.mark.parametrize(
    ("items", "says"),
    [("a prompt", "not str"), (iter([1, 2]), "not list_iterator"), ({"a": [1], "b": [1, 2]}, "differ in length")],
)
def test_what_cannot_be_split_is_refused_in_one_line(items, says):
    with pytest.raises(UsageError, match=says), onegpu.split_between_replicas(items):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return launch_script(tmp_path_factory, "serve_replicas.py", workers=2)[1]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["llama dp2, 7 prompts", "gpt2 dp2, 7 prompts", "llama fsdp, 7 prompts"])
def test_completions_come_back_in_order_as_one_process_makes_them(served, case):
    result = served[case]
    assert len(result["got"]) == 7
    assert result["got"] == result["want"]  # token ids, exact


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_each_replica_completes_its_uneven_share_with_calls_of_its_own(served, model):
    first, second = served[f"{model} dp2, 7 prompts"]["replicas"]
    assert len(first["share"]) == 4 and len(second["share"]) == 3
    assert first["share"] + second["share"] == served[f"{model} dp2, 7 prompts"]["prompts"]
    assert first["collectives"] == second["collectives"] == 0  # not sliced, not fingerprinted, not weighted
    assert first["calls"] > 0 and second["calls"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["llama dp2, 1 prompt", "llama zero1, 1 prompt"])
def test_a_replica_without_prompts_does_not_hang_the_others(served, case):
    one = served[case]
    assert one["got"] == one["want"]
    assert [r["calls"] > 0 for r in one["replicas"]] == [True, False]  # the idle replica never called the model


@pytest.mark.slow
def test_no_prompts_give_no_completions(served):
    none = served["llama dp2, no prompt"]
    assert none["got"] == none["want"] == []


@pytest.mark.slow
def test_a_sharded_model_is_one_replica_whose_workers_compute_the_whole_list(served):
    (replica,) = served["llama fsdp, 7 prompts"]["replicas"]  # one entry: the job is one replica
    assert len(replica["share"]) == 7
