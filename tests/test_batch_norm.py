"""BatchNorm normalises by the global batch's statistics on N workers, as on one device.

A BatchNorm CNN (tests/batch_norm_cnn.py: the loss computed outside the model, SGD with momentum,
then ``eval()``) trains on 2 and 3 workers with uneven slices of a batch of 7 exactly like the plain
process: per-step losses, gradient norms, eval loss, weights and the running statistics. Pipelines,
which would normalise each micro-batch alone, are refused.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from batch_norm_cnn import BatchNormCNN, build, images, train
from conftest import assert_same_training, assert_same_values, launch_script
from safetensors.torch import load_file
from torch import nn

from onegpu.errors import UsageError
from onegpu.parallel.batch_norm import apply_global_batch_norm, batch_norm_layers

LAYERS = [
    (nn.BatchNorm1d, (7, 5)),
    (nn.BatchNorm1d, (7, 5, 3)),
    (nn.BatchNorm2d, (7, 5, 4, 4)),
    (nn.BatchNorm3d, (3, 5, 2, 3, 2)),
]
OPTIONS = [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}]


@pytest.mark.parametrize("options", OPTIONS, ids=[",".join(o) or "default" for o in OPTIONS])
@pytest.mark.parametrize(("layer", "shape"), LAYERS, ids=[f"{c.__name__}{list(s)}" for c, s in LAYERS])
def test_one_replica_normalises_like_batch_norm(layer, shape, options):
    """The global forward on one replica (a user's SyncBatchNorm, which torch refuses on CPU under a process
    group): outputs, input and weight gradients, running statistics and eval outputs of nn.BatchNorm."""
    torch.manual_seed(0)
    plain = layer(5, **options)
    if plain.affine:
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5), plain.bias.uniform_(-1, 1)
    ours = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(copy.deepcopy(plain)))[0]
    apply_global_batch_norm(ours, group=None)
    assert isinstance(ours, nn.SyncBatchNorm) and ours.state_dict().keys() == plain.state_dict().keys()
    for _ in range(3):
        x = (torch.randn(shape) * 3 + 2).requires_grad_()
        mine = x.detach().clone().requires_grad_()
        grad = torch.randn(shape)
        (plain(x) * grad).sum().backward()
        (ours(mine) * grad).sum().backward()
        torch.testing.assert_close(mine.grad, x.grad, rtol=1e-5, atol=1e-5)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=1e-6, atol=1e-6, msg=name)
    if plain.affine:
        torch.testing.assert_close(ours.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    plain.eval(), ours.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-6)


def test_plain_batch_norm_is_untouched_on_one_replica():
    model = BatchNormCNN()
    apply_global_batch_norm(model, group=None)
    assert type(model.norm) is nn.BatchNorm1d
    assert batch_norm_layers(model) == ["stem.1", "blocks.0.norm", "blocks.1.norm", "spread", "norm"]


@pytest.mark.parametrize("selective", [False, True])
def test_recomputing_a_checkpointed_block_counts_its_batch_once(selective):
    """Activation checkpointing, whole or selective, runs a block's BatchNorm again in backward: its running
    statistics and num_batches_tracked stay those of one forward, and the gradients those without checkpointing."""
    from onegpu.parallel.checkpointing import apply_activation_checkpointing

    plain = BatchNormCNN()
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(list(checkpointed.blocks), selective=selective)
    x, y = images()[:7]
    for model in (plain, checkpointed):
        for _ in range(2):
            torch.nn.functional.cross_entropy(model(x), y).backward()
    for (name, value), expected in zip(checkpointed.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    for (name, param), expected in zip(checkpointed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(param.grad, expected.grad, rtol=0, atol=0, msg=name)


def test_the_inspection_names_the_first_batch_norm_layer():
    from onegpu.planner.inspection import describe

    assert describe(BatchNormCNN(), sample=(images()[0][0][None],), seq_len=1).batch_norm == "stem.1"
    assert describe(nn.Sequential(nn.Linear(4, 4)), sample=(torch.ones(1, 4),), seq_len=1).batch_norm is None


def test_the_search_plans_a_batch_norm_model_without_pipelines_or_micro_batches():
    """A model the search would pipeline (48 blocks on 4 nodes of 8 devices of 40 GB) is planned without pp
    and without accumulation steps once it has BatchNorm; pinning either is refused in one line."""
    from test_planner_search import cluster, transformer

    from onegpu.planner.inspection import ModelDescription
    from onegpu.planner.search import find_plan

    plain = ModelDescription.of_profile(transformer(layers=48, hidden=8192))
    with_batch_norm = replace(plain, batch_norm="stem.bn")
    job = dict(global_batch_size=64, seq_len=2048, cluster=cluster(nodes=4, per_node=8, memory_gb=40))
    assert find_plan(plain, **job).pp > 1
    chosen = find_plan(with_batch_norm, **job)
    assert (chosen.pp, chosen.microbatches) == (1, 1)
    for pins in ({"pp": 2}, {"pipeline_parallel": True}, {"microbatches": 2}):
        with pytest.raises(UsageError, match=r"has BatchNorm layers \('stem.bn'\).*use a plan without pp or micro"):
            find_plan(with_batch_norm, **job, **pins)


@pytest.fixture(scope="module")
def reference():
    return {sync: train(sync=sync) for sync in (False, True)} | {"batch of 8": train(batch=8)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {workers: launch_script(tmp_path_factory, "train_batch_norm.py", workers=workers) for workers in (2, 3)}


def trained(out, name: str, *, sync: bool = False) -> nn.Module:
    """The run's checkpoint, loaded into a plain model: the user's state_dict keys, buffers included."""
    model = build(sync=sync)
    model.load_state_dict(load_file(out / name / "model.safetensors"))
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "name"),
    [(2, "ddp"), (2, "fsdp"), (2, "sync-ddp"), (2, "zero3-sync"), (2, "ddp-checkpoint"), (3, "ddp"), (3, "fsdp")],
)
def test_batch_norm_trains_like_one_device(reference, runs, workers, name):
    out, results = runs[workers]
    sync = "sync" in name
    run, ref = results[name], reference[sync]
    assert run["norm_is_users_class"], run["norm_class"]
    assert run["checkpointed_blocks"] == (2 if "checkpoint" in name else 0)
    model = trained(out, name, sync=sync)
    assert_same_training(run, ref, trained=model)
    for (key, value), expected in zip(model.state_dict().items(), ref["model"].state_dict().values()):
        if "running" in key or "num_batches" in key:
            assert_same_values(value.tolist(), expected.tolist(), what=key)


@pytest.mark.slow
def test_pipelines_are_refused_and_the_planner_avoids_them(reference, runs):
    """A pipeline given to prepare, or pinned for Advanced Parallelization, is refused in one line; the planner's
    own choice has no pipeline or micro-batches and trains like one device."""
    _, results = runs[2]
    for refused in ("refused-given-pp", "refused-pinned-pp"):
        assert results[refused] == (
            "BatchNormCNN has BatchNorm layers ('stem.1'), whose batch statistics micro-batches cannot share: "
            "use a plan without pp or micro-batches (data or tensor parallelism)"
        )
    advanced = results["advanced"]
    assert (advanced["plan"]["pp"], advanced["plan"]["microbatches"]) == (1, 1)
    assert_same_training(advanced, reference["batch of 8"])
