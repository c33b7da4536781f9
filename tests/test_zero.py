"""ZeRO-1, optimizer-only offload and hybrid sharding train exactly like one device, and hold what they say.

Reference: the same single-device loop in this process (AdamW, or Adam), with ``clip_grad_norm_`` on
``model.parameters()`` every step, under the suite's one tolerance policy. SkipNet's output bias has one
element, fewer than the workers: one worker's ZeRO-1 piece of it is empty.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_training, assert_same_values, launch_script
from resume import resumed_losses
from scenarios import train
from test_single_device_equivalence import load_checkpoint

from onegpu.errors import UsageError
from onegpu.plan import Plan
from onegpu.runtime.execute import check_executable

ADAM = {"hf-zero1-offload", "tower-ddp-offload"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {workers: launch_script(tmp_path_factory, "train_zero.py", workers=workers) for workers in (2, 4)}


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def reference_of(name: str) -> dict:
        scenario, adam = name.split("-")[0], name in ADAM
        if (scenario, adam) not in cache:
            cache[scenario, adam] = train(scenario, optimizer_class=torch.optim.Adam if adam else None)
        return cache[scenario, adam]

    return reference_of


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, workers",
    [
        ("custom-zero1-offload_parameters", 2),
        ("hf-zero1-offload", 2),
        ("tower-ddp-offload", 2),
        ("custom-fsdp-offload", 2),
        ("custom-hybrid-offload", 4),
    ],
)
def test_same_training_as_one_device(runs, reference, name, workers):
    out, results = runs[workers]
    run = results[name]
    assert_same_training(run, reference(name), trained=load_checkpoint(name.split("-")[0], out / name))
    if name.endswith("offload"):  # the optimizer's tensors are the host's own, apart from the parameters
        assert all(worker["state_apart"] for worker in run["workers"])


@pytest.mark.slow
def test_zero1_holds_one_piece_of_the_optimizer_state_per_worker(runs):
    """Adam's two fp32 moments of every element, split in halves (pieces round up per parameter)."""
    for name in ("custom-zero1-offload_parameters", "hf-zero1-offload"):
        run = runs[2][1][name]
        whole = 2 * 4 * run["whole_params"]
        held = [worker["state_bytes"] for worker in run["workers"]]
        assert sum(held) == whole and max(held) <= whole / 2 + 2 * 4 * 32  # 32 parameters at most round up
        assert [worker["held_params"] for worker in run["workers"]] == [run["whole_params"]] * 2  # replicated


@pytest.mark.slow
def test_hybrid_shards_inside_groups_of_two_and_replicates_across(runs):
    run = runs[4][1]["custom-hybrid-offload"]
    for worker in run["workers"]:
        assert "(Replicate(), Shard(dim=0))" in worker["placements"]
        assert worker["held_params"] < 0.7 * run["whole_params"]  # half, rows rounding up
    assert run["workers"][0] == run["workers"][2] and run["workers"][1] == run["workers"][3]


@pytest.mark.slow
def test_zero1_offloaded_optimizer_state_saved_and_loaded_continues_the_training(runs, tmp_path):
    """ZeRO-1 with its state on the host: four steps, the model and each worker's optimizer.state_dict() saved,
    four more in new objects loaded from them: the losses of one device doing the same."""
    assert_same_values(runs[2][1]["resumed"], resumed_losses(tmp_path), what="losses before and after resuming")


@pytest.mark.slow
def test_misuse_is_refused_in_one_line(runs):
    results = runs[2][1]
    assert "each worker loads the optimizer.state_dict() it saved itself" in results["wrong_piece"]
    assert "not Adafactor: plan sharding='gradients' instead" in results["adafactor"]


def test_a_hybrid_plan_says_its_shard_group():
    plan = Plan(dp=4, sharding="hybrid", shard_group=2)
    assert Plan.from_json(plan.to_json()) == plan and "groups of 2" in plan.describe()
    with pytest.raises(UsageError, match="needs shard_group"):
        Plan(dp=4, sharding="hybrid", shard_group=3)
    with pytest.raises(UsageError, match="is for sharding='hybrid'"):
        Plan(dp=4, sharding="parameters", shard_group=2)


def test_an_interleaved_schedule_over_fsdp_shards_is_refused_in_one_line():
    """FSDP2 cannot shard the two stages each worker runs (the search proposes none of these plans)."""
    with pytest.raises(UsageError, match="use sharding 'none' or 'optimizer' with it, or the gpipe or 1f1b schedule"):
        check_executable(Plan(dp=2, pp=2, microbatches=4, schedule="interleaved", sharding="parameters"))
    check_executable(Plan(dp=2, pp=2, microbatches=4, schedule="interleaved", sharding="optimizer"))
