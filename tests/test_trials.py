"""enable_advanced_parallelization(trials=k): prepare() times the planner's k best plans on the job's workers and
keeps the measured fastest, and the training is exactly the one that plan gives when it is passed to prepare()."""

import re

import pytest
from conftest import assert_same_training, assert_same_values, run_onegpu
from test_single_device_equivalence import load_checkpoint

SCENARIOS = ["hf", "custom"]  # a Hugging Face Llama; a hand-written module whose forward returns its loss


@pytest.mark.parametrize("trials", [2.5, "three", True, -1])
def test_trials_that_are_not_a_whole_number_of_plans_are_refused_where_given(trials):
    import onegpu
    from onegpu.errors import UsageError

    message = f"trials={trials!r}: give how many of the best plans to time, a whole number >= 1, e.g. 3"
    with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
        onegpu.enable_advanced_parallelization(trials=trials)
    assert onegpu.api._pins is None and onegpu.api._trials is None  # nothing was enabled


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trials")
    result = run_onegpu(
        "run", "--workers", "2", "tests/scripts/trials.py", str(out), timeout=600, env={"ONEGPU_MEASURE_COMPILE": "0"}
    )
    assert result.returncode == 0, result.stderr
    import json

    return out, json.loads((out / "results.json").read_text()), result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_training_after_trials_is_training_with_the_chosen_plan_given(runs, scenario):
    out, results, _ = runs
    tried, direct = results[scenario]["tried"], results[scenario]["direct"]
    reference = {**direct, "model": load_checkpoint(scenario, out / f"{scenario}-direct")}
    assert_same_training(tried, reference, trained=load_checkpoint(scenario, out / f"{scenario}-tried"))
    assert_same_values(tried["after"], direct["after"], what="random numbers drawn after training")


@pytest.mark.slow
def test_one_line_per_prepare_gives_each_trial_predicted_and_measured(runs):
    _, results, stderr = runs
    lines = [line for line in stderr.splitlines() if line.startswith("onegpu: trials (")]
    assert len(lines) == len(SCENARIOS)  # rank 0 only, once per prepare() with trials
    for line, scenario in zip(lines, SCENARIOS):
        trials = re.findall(r"predicted (\d+\.\d+) s, measured (\d+\.\d+) s", line)
        assert 2 <= len(trials) <= 3 and all(float(m) > 0 for _, m in trials)
        fastest = min(float(m) for _, m in trials)
        assert results[scenario]["reason"].startswith("measured fastest of")
        assert f"{fastest:.3f} s/step" in results[scenario]["reason"]
