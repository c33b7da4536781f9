"""onegpu.enable_advanced_parallelization(): prepare() runs the planner's choice, within the memory budget."""

import json

import pytest
from conftest import run_onegpu

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    out = home / "results.json"
    result = run_onegpu(
        "run", "--workers", "2", "tests/scripts/advanced.py", str(out), timeout=600, env={"ONEGPU_HOME": str(home)}
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("advanced parallelization:") == 5  # logged once per prepare(), by rank 0
    return json.loads(out.read_text())


def test_with_room_to_spare_nothing_is_spent_on_memory(runs):
    generous = runs[0]["generous"]
    assert generous["plan"]["activation_checkpointing"] == "none" and generous["plan"]["offload"] == "none"
    layout = generous["plan"]["dp"] * generous["plan"]["tp"] * generous["plan"]["pp"]
    assert layout == 2 and generous["plan"]["precision"] == "fp32"
    assert len(generous["losses"]) == 4  # it ran
    assert "candidates" in generous["reason"] and "fit" in generous["reason"]


def test_a_tight_budget_splits_the_model_and_stays_inside_it(runs):
    tight = runs[0]["tight"]
    plan = tight["plan"]
    assert plan["sharding"] in ("gradients", "parameters") or plan["pp"] == 2 or plan["tp"] == 2
    assert tight["predicted_bytes"] <= 0.70 * 2**30  # memory_budget_gb is in GiB


def test_pins_reach_the_runtime(runs):
    pinned = runs[0]["pinned"]
    assert pinned["plan"]["sharding"] == "parameters" and pinned["plan"]["activation_checkpointing"] == "full"
    assert pinned["checkpointed"] == 4


def test_every_worker_trains_the_same_plan_and_sees_the_same_global_loss(runs):
    for name in ("generous", "tight", "pinned", "pipeline"):
        assert runs[0][name]["plan"] == runs[1][name]["plan"]
        assert runs[0][name]["losses"] == runs[1][name]["losses"]
        assert runs[0][name]["losses"][-1] < runs[0][name]["losses"][0]


def test_a_budget_nothing_fits_is_a_clear_error_on_every_worker(runs):
    for worker in runs:
        assert worker["impossible"]["error"].startswith("no plan fits: the smallest needs ")


def test_pinned_stages_micro_batches_and_schedule_run_on_the_pipeline_runtime(runs):
    plan = runs[0]["pipeline"]["plan"]
    assert (plan["pp"], plan["dp"], plan["microbatches"], plan["schedule"]) == (2, 1, 4, "1f1b")
    pipeline = runs[0]["pipeline"]
    assert len(pipeline["losses"]) == 4 and pipeline["losses"] == runs[1]["pipeline"]["losses"]


def test_a_pinned_tensor_parallel_degree_runs_on_the_tensor_parallel_runtime(runs):
    tensor = runs[0]["tensor"]
    assert (tensor["plan"]["tp"], tensor["plan"]["dp"]) == (2, 1)
    assert len(tensor["losses"]) == 4 and tensor["losses"] == runs[1]["tensor"]["losses"]
