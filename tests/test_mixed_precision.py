"""bf16 plans of every layout train like the emulated bf16 device, and within 2 % of fp32.

The emulated device (tests/emulated.py) runs the slices the workers run in bf16, sums their gradients
in fp32 and steps an fp32 optimizer on fp32 master weights. One worker, replicated, ZeRO-2, ZeRO-3 and
a pipeline match it under the suite's fp32 policy; tensor parallelism (and a pipeline whose stages share
a parameter) under the bound of tests/conftest.py. A Llama from its config and a hand-written model.
"""

from __future__ import annotations

import pytest
from conftest import assert_like_emulated_bf16, assert_like_fp32, assert_same_values, launch_script
from emulated import train_emulated
from scenarios import train
from test_single_device_equivalence import load_checkpoint

from onegpu.plan import Plan
from onegpu.runtime.execute import check_executable

# the slices of each layout's forwards (replicas, micro-batches), and whether it sums in another order
LAYOUTS = {
    "single": (1, 1, False),
    "ddp": (2, 1, False),
    "zero2": (2, 1, False),
    "fsdp": (2, 1, False),
    "pp2": (1, 5, False),
    "tp2": (1, 1, True),
    "tp2-dp2": (2, 1, True),
    "pp2-dp2": (2, 1, False),
    "tp2-pp2": (1, 5, True),
}
REORDERED_PIPELINE = {"custom"}  # its skip connection's input projection is used by the first and last stage


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    return launch_script(tmp_path_factory, "train_mixed_precision.py", workers=1)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    return launch_script(tmp_path_factory, "train_mixed_precision.py", workers=2)


@pytest.fixture(scope="module")
def four_workers(tmp_path_factory):
    return launch_script(tmp_path_factory, "train_mixed_precision.py", workers=4)


@pytest.fixture(scope="module")
def fp32():
    return {scenario: train(scenario) for scenario in ("hf", "custom")}


_emulated: dict = {}


def emulated(scenario: str, replicas: int, microbatches: int) -> dict:
    key = (scenario, replicas, microbatches)
    if key not in _emulated:
        _emulated[key] = train_emulated(scenario, replicas=replicas, microbatches=microbatches)
    return _emulated[key]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["hf", "custom"])
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if "-" not in name])
def test_bf16_trains_like_the_emulated_bf16_device(one_worker, two_workers, fp32, scenario, layout):
    if layout == "tp2" and scenario == "custom":
        pytest.skip("the hand-written model has no tensor-parallel structure")
    check(one_worker if layout == "single" else two_workers, fp32, scenario, layout)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2-dp2", "pp2-dp2", "tp2-pp2"])
def test_bf16_in_two_dimensions_trains_like_the_emulated_bf16_device(four_workers, fp32, layout):
    check(four_workers, fp32, "hf", layout)


def check(launched, fp32: dict, scenario: str, layout: str) -> None:
    out, results = launched
    run = results[f"{scenario}-{layout}"]
    replicas, microbatches, reordered = LAYOUTS[layout]
    reordered = reordered or (layout == "pp2" and scenario in REORDERED_PIPELINE)
    reference = emulated(scenario, replicas, microbatches)
    trained = None if reordered else load_checkpoint(scenario, out / f"{scenario}-{layout}")
    assert_like_emulated_bf16(run, reference, reordered=reordered, trained=trained)
    assert_like_fp32(run["losses"], fp32[scenario]["losses"])
    assert run["dtypes"] == ["torch.float32"]  # the master weights the loop and the optimizer see


@pytest.mark.slow
def test_a_loop_under_autocast_keeps_working(two_workers):
    run = two_workers[1]["hf-ddp-autocast"]
    assert_like_emulated_bf16(run, emulated("hf", 2, 1), reordered=True)  # autocast's own casts: its rounding


@pytest.mark.slow
def test_the_advanced_parallelization_pin_reaches_the_plan(two_workers):
    assert two_workers[1]["pinned"] == "bf16"


@pytest.mark.slow
def test_fp16_is_refused_on_a_cpu_naming_bf16(one_worker):
    message = one_worker[1]["fp16"]
    assert "bf16" in message and "\n" not in message


def test_every_precision_is_executable():
    check_executable(Plan(dp=2, tp=2, pp=2, schedule="1f1b", microbatches=2, precision="bf16"))
    check_executable(Plan(dp=2, sharding="parameters", precision="fp16"))


@pytest.mark.slow
def test_the_loss_scale_changes_no_gradient_and_skips_overflowing_steps(two_workers):
    """fp16's dynamic loss scale (GPU only), run on bf16: scaling by a power of two and dividing again in fp32
    changes nothing; a scale that overflows skips the step and halves until the gradients are finite."""
    results = two_workers[1]
    for layout in ("ddp", "pp2"):  # the scale on each output, or on each micro-batch's loss inside the pipeline
        scaled = results[f"hf-{layout}-scaled"]
        assert_same_values(scaled["losses"], results[f"hf-{layout}"]["losses"], what="per-step losses")
        assert_same_values(scaled["grad_norms"], results[f"hf-{layout}"]["grad_norms"], what="gradient norms")
        assert scaled["skipped"] == 0 and scaled["scale"] == 2.0**18  # doubled after every 3 good steps
    overflow = results["hf-ddp-overflow"]
    assert 0 < overflow["skipped"] < len(overflow["losses"]) and overflow["scale"] < 2.0**130
