"""The Hugging Face Trainer on the virtual device (onegpu.integrations.transformers): a Trainer script with one
changed import trains as one device does, logs once, and its checkpoints are onegpu's sharded states that resume
exactly on another number of workers and another plan."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT, run_onegpu

from onegpu.errors import UsageError
from onegpu.integrations.trainer_checkpoints import last_complete, rotate
from onegpu.runtime import state_files

LOSS_RTOL = 1e-5  # fp32: the same sums as one device's, cut into slices (measured: 1.3e-7)
SCRIPT = "tests/scripts/train_trainer.py"


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """GPT-2 (odd vocabulary, tied embeddings), a global batch of 4 with 2 accumulated batches and padded
    sequences: a plain one-process transformers.Trainer (the reference, run meanwhile), onegpu's Trainer on
    2 workers with FSDP stopped once checkpoint-8 is saved, then resumed from it on 3 workers (DDP)."""
    root = tmp_path_factory.mktemp("trainer")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    plain = subprocess.Popen([sys.executable, SCRIPT, str(root / "plain"), "plain", "gpt2"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        first = run_onegpu("run", "--workers", "2", SCRIPT, str(root / "first"), "first", "gpt2", "fsdp", timeout=300)
        assert first.returncode == 0, first.stderr
        resumed = run_onegpu("run", "--workers", "3", SCRIPT, str(root / "resume"), "resume", "gpt2", timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert plain.wait(timeout=300) == 0, plain.stderr.read()
    finally:
        plain.kill()
        plain.wait()
    runs = {name: json.loads((root / name / "results.json").read_text()) for name in ("plain", "first", "resume")}
    return runs, first, root


def _relative_errors(values: dict, reference: dict) -> list[float]:
    return [abs(values[key] - reference[key]) / abs(reference[key]) for key in values]


@pytest.mark.slow
def test_logged_losses_and_evaluation_are_one_devices_before_and_after_resuming_on_3_workers(trainer_runs):
    runs, _, _ = trainer_runs
    plain, first, resumed = runs["plain"], runs["first"], runs["resume"]
    assert sorted(first["losses"], key=int) == [str(s) for s in range(1, 9)]
    assert sorted(resumed["losses"], key=int) == [str(s) for s in range(9, 13)]
    losses = {**first["losses"], **resumed["losses"]}
    assert max(_relative_errors(losses, plain["losses"])) < LOSS_RTOL
    evaluations = {**first["eval_losses"], **resumed["eval_losses"]}  # at step 6, step 12, trainer.evaluate()
    assert set(evaluations) == set(plain["eval_losses"]) == {"6", "12", "end"}
    assert max(_relative_errors(evaluations, plain["eval_losses"])) < LOSS_RTOL
    logits = {**first["label_logits"], **resumed["label_logits"]}  # compute_metrics sees every row's logits
    assert logits == pytest.approx(plain["label_logits"], rel=LOSS_RTOL, abs=1e-6)  # a mean of logits near 0
    assert first["plan"] == "dp=2, sharding=parameters, fp32" and resumed["plan"] == "dp=3, sharding=none, fp32"


@pytest.mark.slow
def test_checkpoints_are_onegpu_states_with_the_trainers_state_and_rotation_keeps_the_limit(trainer_runs):
    runs, _, _ = trainer_runs
    assert runs["first"]["checkpoints"] == ["checkpoint-8"]  # save_total_limit=1: checkpoint-4 removed
    files = set(runs["first"]["checkpoint_files"])
    state = "checkpoint-8/step-00000008"
    assert {f"{state}/COMMITTED", f"{state}/__0_0.distcp", f"{state}/__1_0.distcp", f"{state}/random-1.pt"} <= files
    assert {"checkpoint-8/trainer_state.json", "checkpoint-8/rng_state.pth"} <= files
    assert not [f for f in files if f.endswith((".safetensors", "optimizer.pt", "rng_state_1.pth"))]
    assert runs["resume"]["checkpoints"] == ["checkpoint-12"]


@pytest.mark.slow
def test_save_model_writes_the_whole_model_for_from_pretrained(trainer_runs):
    saved = trainer_runs[0]["first"]["saved_model"]
    assert saved["architectures"] == ["GPT2LMHeadModel"]
    assert saved["loaded"] == pytest.approx(saved["trained"], rel=LOSS_RTOL)


@pytest.mark.slow
def test_only_rank_0_logs(trainer_runs):
    _, first, _ = trainer_runs
    assert len(re.findall(r"\{'loss': ", first.stdout + first.stderr)) == 8


def _checkpoint(run_dir, step: int, *, committed: bool = True, trainer_state: bool = True):
    folder = run_dir / f"checkpoint-{step}"
    state = state_files.step_directory(folder, step)
    state.mkdir(parents=True)
    if committed:
        state_files.commit(state, step=step, workers=2)
    if trainer_state:
        (folder / "trainer_state.json").write_text("{}")
    return folder


def test_a_save_killed_half_way_neither_resumes_nor_pushes_out_a_complete_checkpoint(tmp_path):
    kept = [_checkpoint(tmp_path, 4), _checkpoint(tmp_path, 8)]
    _checkpoint(tmp_path, 6, committed=False)  # an older crash's leftovers
    _checkpoint(tmp_path, 12, trainer_state=False)  # killed after the state, before trainer_state.json
    _checkpoint(tmp_path, 16, committed=False, trainer_state=False)  # killed while the workers wrote
    assert last_complete(tmp_path) == kept[-1]
    steps = lambda: sorted(int(p.name.split("-")[1]) for p in tmp_path.iterdir())  # noqa: E731
    rotate(tmp_path, limit=2)
    assert steps() == [4, 8, 12, 16]  # 6 removed; 12 and 16 may be the newest saves, still being written
    rotate(tmp_path, limit=1, keep=kept[0])  # the best model's checkpoint is kept beyond the limit
    assert steps() == [4, 8, 12, 16]
    rotate(tmp_path, limit=1)
    assert steps() == [8, 12, 16]


@pytest.mark.parametrize(
    ("arguments", "fix"),
    [
        ({"fsdp": "full_shard"}, "remove fsdp from the TrainingArguments"),
        ({"deepspeed": "ds.json"}, "remove deepspeed from the TrainingArguments"),
        (None, "pass args=TrainingArguments(output_dir=...)"),
    ],
)
def test_what_would_split_the_work_twice_is_refused_in_one_line(arguments, fix):
    from onegpu.integrations.single_process import check_training_args

    training_args = None if arguments is None else SimpleNamespace(**arguments)  # the attributes it reads
    with pytest.raises(UsageError, match=re.escape(fix)) as error:
        check_training_args(training_args)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("model", "fix"),
    [
        (SimpleNamespace(onegpu_plan=None), "give the Trainer the model itself"),
        (SimpleNamespace(is_distributed_loading_by_transformers=True), "load it whole, onegpu splits it"),
    ],
)
def test_a_model_split_already_is_refused_in_one_line(model, fix):
    from onegpu.integrations.single_process import check_model

    with pytest.raises(UsageError, match=re.escape(fix)):
        check_model(model)
