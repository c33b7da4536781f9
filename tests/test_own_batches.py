"""Loops that build their own batches (``get_batch()``, tensors made in the loop), gradient accumulation in the
user's loop, and the loss computed outside the model: each worker computes its slice of every global batch,
and training matches one device's (tests/own_batches.py, against a plain process)."""

import pytest
import torch
from conftest import assert_same_parameters, assert_same_values, launch_script
from own_batches import GPT, MLP, GPTConfig, accumulated, external, loader_copies, nanogpt
from scenarios import SkipNet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference():
    return {
        "nanogpt": nanogpt(),
        "nanogpt-partial": nanogpt(accumulation=(3, 3, 1, 3)),
        "nanogpt-k3": nanogpt(accumulation=(3, 3, 3)),
        "nanogpt-k2": nanogpt(accumulation=(2, 2, 2)),
        "external": external(),
        "accumulated": accumulated(),
        "loader-copies": loader_copies(),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {workers: launch_script(tmp_path_factory, "train_own_batches.py", workers=workers)[1] for workers in (2, 3)}


def module(parameters: dict, build) -> torch.nn.Module:
    model = build()
    model.load_state_dict({k: torch.tensor(v) for k, v in parameters.items()}, strict=False)
    return model


def assert_trained_alike(run: dict, ref: dict, build) -> None:
    assert_same_values(run["losses"], ref["losses"], what="per-step losses")
    assert_same_values(run["grad_norms"], ref["grad_norms"], what="gradient norms")
    assert_same_parameters(module(run["parameters"], build), module(ref["parameters"], build))


@pytest.mark.parametrize(
    ("workers", "name", "ref"),
    [
        (2, "nanogpt-ddp", "nanogpt"),
        (2, "nanogpt-fsdp", "nanogpt"),
        (3, "nanogpt-ddp", "nanogpt-k3"),  # a batch of 8 on 3 workers: slices of 3, 3 and 2
        (3, "nanogpt-fsdp", "nanogpt-k2"),
    ],
)
def test_nanogpt_loop_trains_like_one_device(reference, runs, workers, name, ref):
    run = runs[workers][name]
    assert_trained_alike(run, reference[ref], lambda: GPT(GPTConfig()))
    assert run["rows"] == (4 if workers == 2 else 3), "each worker computes only its slice of the global batch"


@pytest.mark.parametrize(("workers", "name"), [(2, "nanogpt-ddp"), (2, "nanogpt-fsdp"), (3, "nanogpt-ddp")])
def test_accumulated_gradients_are_reduced_once_per_step(runs, workers, name):
    first, *later = runs[workers][name]["reductions_per_step"]
    k = 2 if workers == 2 else 3
    units = first // k  # the first step, before k is known, reduces on every backward
    assert units > 0 and first == units * k
    assert later == [units] * len(later)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_last_partial_accumulation_is_exact(reference, runs, strategy):
    run, ref = runs[2][f"nanogpt-{strategy}-partial"], reference["nanogpt-partial"]
    assert_same_values(run["losses"], ref["losses"], what="per-step losses")
    assert_same_parameters(
        module(run["parameters"], lambda: GPT(GPTConfig())), module(ref["parameters"], lambda: GPT(GPTConfig()))
    )
    first, second, partial, longer = run["reductions_per_step"]
    assert second == partial == longer == first // 3, "at most one reduction per optimizer step"


@pytest.mark.parametrize(("workers", "name"), [(2, "external-ddp"), (3, "external-fsdp")])
def test_a_loss_computed_outside_the_model_from_global_targets(reference, runs, workers, name):
    run = runs[workers][name]  # a batch of 7: on 3 workers, slices of 3, 2 and 2
    assert_trained_alike(run, reference["external"], MLP)
    assert run["rows"] == [7] * 4, "the loop sees the outputs of the whole global batch"


def test_workers_drawing_different_batches_stop_with_one_line(runs):
    message = runs[2]["seeded-per-rank"]
    assert message.startswith("worker 1's batch differs from worker 0's: ") and "\n" not in message


def test_accumulation_under_a_pipeline_is_exact(reference, runs):
    """Each call runs the whole pipeline (its backward too); ``(loss / k).backward()`` scales that call's
    gradients, and a parameter two stages share is summed once per call (SkipNet's input layer)."""
    run, ref = runs[2]["accumulated-pp2"], reference["accumulated"]
    assert_same_values(run["losses"], ref["losses"], what="per-step losses")
    assert_same_parameters(
        module(run["parameters"], lambda: SkipNet(depth=4)), module(ref["parameters"], lambda: SkipNet(depth=4))
    )


def test_nanogpt_loop_under_a_pipeline_trains_like_one_device(reference, runs):
    """``logits, loss = model(X, Y)`` unpacks under pp2; accumulation over 2 calls per step."""
    assert_trained_alike(runs[2]["nanogpt-pp2"], reference["nanogpt"], lambda: GPT(GPTConfig()))


def test_dropout_masks_differ_between_replicas_and_leave_the_loop_s_stream(runs):
    assert runs[2]["dropout"] == {"replicas_differ": True, "stream_kept": True}


def test_copies_of_a_loader_s_slices_are_not_sliced_again(reference, runs):
    run = runs[3]["loader-copies"]  # batches of 7 on 3 workers: slices of 3, 2 and 2
    assert run["rows"] == [[3] * 4, [2] * 4, [2] * 4]
    assert_same_parameters(module(run["parameters"], MLP), module(reference["loader-copies"]["parameters"], MLP))
