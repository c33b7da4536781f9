"""N workers train exactly like one device: same losses, gradient norms and final parameters.

Reference: the same single-device code run as plain PyTorch in this process. fp32 on CPU;
the only differences are summation order in reductions, which the suite's one tolerance policy
(tests/conftest.py) allows.
"""

from __future__ import annotations

import json

import pytest
from conftest import assert_same_training, run_onegpu
from safetensors.torch import load_file
from scenarios import build, train

SCENARIOS = ("hf", "gpt2", "custom", "external")
STRATEGIES = ("ddp", "fsdp")
WORKERS = (1, 2, 3)
# activation checkpointing and offload (run on 2 workers; see tests/scripts/train_scenarios.py)
MEMORY_PLANS = ("fsdp-checkpoint-offload", "zero2-checkpoint-1", "ddp-checkpoint-full", "fsdp-selective")


@pytest.fixture(scope="module")
def reference():
    return {s: train(s) for s in SCENARIOS}


@pytest.fixture(scope="module")
def onegpu_runs(tmp_path_factory):
    runs = {}
    for workers in WORKERS:
        out = tmp_path_factory.mktemp(f"workers{workers}")
        result = run_onegpu("run", "--workers", str(workers), "tests/scripts/train_scenarios.py", str(out), timeout=300)
        assert result.returncode == 0, result.stderr
        runs[workers] = (out, json.loads((out / "results.json").read_text()))
    return runs


def load_checkpoint(scenario: str, path, *, layers: int = 2):
    if scenario in ("hf", "gpt2"):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path)
    model, _ = build(scenario, layers=layers)
    model.load_state_dict(load_file(path / "model.safetensors"))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_training_as_one_device(reference, onegpu_runs, scenario, strategy, workers):
    out, results = onegpu_runs[workers]
    run, ref = results[f"{scenario}-{strategy}"], reference[scenario]
    slices = {1: [5], 2: [3, 2], 3: [2, 2, 1]}[workers]
    assert run["local_batch_sizes"] == [[size] * 8 for size in slices], "each worker loads only its slice"
    if workers > 1:
        assert run["model_class"].startswith("DDP" if "ddp" in strategy else "FSDP")  # DDP's reducer, FSDP2
    expected_checkpointed = {
        "fsdp-checkpoint-offload": 2 if scenario in ("hf", "gpt2") else 3,
        "zero2-checkpoint-1": 1,
        "ddp-checkpoint-full": 2 if scenario in ("hf", "gpt2") else 3,
        "fsdp-selective": 2 if scenario in ("hf", "gpt2") else 3,  # every block, keeping its matmul outputs
    }.get(strategy, 0)
    assert run["checkpointed_blocks"] == expected_checkpointed
    trained = load_checkpoint(scenario, out / f"{scenario}-{strategy}")
    # a loss computed outside the model is each worker's own (see README)
    assert_same_training(run, ref, trained=trained, loss=scenario != "external")


@pytest.mark.slow
def test_a_loss_given_to_prepare_is_the_global_batch_loss(reference, onegpu_runs):
    """prepare(..., loss_fn=mse_loss) and model(x, target=y) on 3 workers (slices of 2, 2 and 1): the loss
    each worker sees is the whole batch's, as on one device."""
    out, results = onegpu_runs[3]
    run, ref = results["external-ddp-loss_fn"], reference["external"]
    assert_same_training(run, ref, trained=load_checkpoint("external", out / "external-ddp-loss_fn"))


@pytest.mark.slow
@pytest.mark.parametrize("memory_plan", MEMORY_PLANS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_checkpointing_and_offload_train_like_one_device(reference, onegpu_runs, scenario, memory_plan):
    test_same_training_as_one_device(reference, onegpu_runs, scenario, memory_plan, 2)
