"""A 2-stage pipeline trains like one device, with the user's loop unchanged.

HF Llama, GPT-2 (input and output embeddings tied across the two stages: their gradients are
summed) and a hand-written model whose skip connection spans every block; GPipe and 1F1B; each
against the same code run as a plain single process: the same per-step losses, gradient norms and
final parameters, under the suite's one tolerance policy (tests/conftest.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_training, launch_script, run_onegpu
from job_records import launched_job
from scenarios import build, decoder_size, train
from test_single_device_equivalence import load_checkpoint
from typer.testing import CliRunner

from onegpu.cli import app
from onegpu.errors import UsageError

SCENARIOS = ("hf", "gpt2", "custom")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    return launch_script(tmp_path_factory, "train_pipeline.py", workers=2)


@pytest.fixture(scope="module")
def pipeline_by_data_run(tmp_path_factory):
    return launch_script(tmp_path_factory, "train_pipeline.py", workers=4)


@pytest.fixture(scope="module")
def reference():
    return {s: train(s) for s in SCENARIOS}


@pytest.fixture(scope="module")
def deeper_reference():
    return {s: train(s, layers=4, batch=4) for s in SCENARIOS}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "1f1b-checkpointed"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pipeline_trains_like_one_device(pipeline_run, reference, scenario, schedule):
    check(pipeline_run, reference[scenario], scenario, schedule)


@pytest.mark.parametrize("schedule", ["interleaved", "zero-bubble"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_interleaved_pipeline_trains_like_one_device(pipeline_run, deeper_reference, scenario, schedule):
    """4 stages on 2 workers, each running stages i and i + 2; zero-bubble splits backward in two."""
    check(pipeline_run, deeper_reference[scenario], scenario, schedule)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pipeline_times_data_parallel_trains_like_one_device(pipeline_by_data_run, reference, scenario):
    check(pipeline_by_data_run, reference[scenario], scenario, "dp2-gpipe")
    assert pipeline_by_data_run[1][f"{scenario}-dp2-gpipe"]["local_batch_sizes"] == [3] * 8  # replica 0's slice


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pipeline_times_fsdp_trains_like_one_device(pipeline_by_data_run, reference, scenario):
    """Each stage sharded over its 2 replicas (ZeRO-3, offload), every block checkpointed."""
    check(pipeline_by_data_run, reference[scenario], scenario, "fsdp2-gpipe")
    held = pipeline_by_data_run[1][f"{scenario}-fsdp2-gpipe"]["held"]
    assert held < 0.7 * pipeline_by_data_run[1][f"{scenario}-dp2-gpipe"]["held"]  # a shard of its stage


def test_the_run_report_of_a_pipelined_job(pipeline_run):
    """`onegpu report JOB` on what `onegpu run` kept of a real job (the browser checks the page in test_report.py)."""
    directory = launched_job(pipeline_run[0])
    result = CliRunner().invoke(app, ["report", directory.name])
    assert result.exit_code == 0, result.output
    page = (directory / "report.html").read_text()
    assert f"onegpu job {directory.name}" in page and "ended</span> (exit 0)" in page
    assert "steps recorded" in page and "peak memory per worker (GiB)" in page
    assert "no plan recorded yet" not in page and "pp=2" in page
    assert "<th>device-minutes</th>" in page  # its two leases, from the pool's ledger
    assert page.count('<svg class="chart"') >= 3  # loss, throughput, memory per worker


def test_each_worker_allocates_only_its_stage(tmp_path):
    """A 252 MB Llama built on the meta device: each of 2 stages materializes and trains its half."""
    result = run_onegpu("run", "--workers", "2", "tests/scripts/pipeline_memory.py", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    first, last = json.loads((tmp_path / "r.json").read_text())
    whole = first["whole"]
    assert first["held"] + last["held"] == pytest.approx(whole, rel=0.01)  # nothing held twice, nothing lost
    for worker in (first, last):
        assert worker["held"] < 0.55 * whole and worker["on_meta"] == 0
        assert worker["optimized"] == worker["held"]  # the optimizer steps exactly the stage's parameters
        assert worker["grown"] < 0.75 * whole  # resident memory: the stage, not the whole model
    assert first["losses"] == last["losses"] and first["losses"][-1] < first["losses"][0]


def check(launched, reference, scenario: str, name: str) -> None:
    out, results = launched
    run = results[f"{scenario}-{name}"]
    assert run["model_class"].startswith("Pipelined") and run["is_the_users_class"]  # a subclass of the user's
    assert run["clip_unpatched"]  # the norm over stages comes from the gradients, not from a patched torch
    assert run["held"] < 0.8  # rank 0 holds its stage's parameters, not the whole model
    checkpointed = name in ("1f1b-checkpointed", "fsdp2-gpipe") and scenario != "tower"  # Tower has no blocks
    assert (run["checkpointed_blocks"] > 0) == checkpointed
    layers = 4 if name in ("interleaved", "zero-bubble") else 2
    trained = load_checkpoint("hf" if scenario == "gpt2" else scenario, out / f"{scenario}-{name}", layers=layers)
    # gradient norms: clipped by the norm over stages; eval loss: forward only, under no_grad
    assert_same_training(run, reference, trained=trained)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_model_without_repeated_blocks_is_cut_from_its_traced_graph(pipeline_run, schedule):
    """Tower's skip connection crosses the cut: its source value is sent along with the activation."""
    check(pipeline_run, train("tower"), "tower", schedule)


@pytest.mark.parametrize("plan", ["dp2-gpipe", "fsdp2-gpipe"])
def test_a_traced_pipeline_times_data_parallel_or_fsdp_trains_like_one_device(pipeline_by_data_run, plan):
    """Replicas of 3 and 2 rows: the gradient of the skip connection's source, a slice of a concatenation's, is
    sent back contiguous."""
    check(pipeline_by_data_run, train("tower"), "tower", plan)


def cuts(model, *, stages: int, sample: dict) -> list[int]:
    """Where a plan of ``stages`` pipeline stages cuts ``model`` (its blocks, or its traced graph's nodes)."""
    from onegpu.plan import Plan
    from onegpu.planner.inspection import describe
    from onegpu.planner.layout import fit_layout

    one = {k: v[:1] for k, v in sample.items()}
    try:
        description, why = describe(model, sample=one, seq_len=one[next(iter(one))].shape[-1]), ""
    except UsageError as error:
        description, why = None, str(error)
    plan = Plan(dp=1, pp=stages, schedule="gpipe")
    return list(fit_layout(plan, description, model=model, sample=sample, unavailable=why).stages.cuts)


def test_a_model_that_does_not_trace_is_named_where_it_broke():
    class Gate(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent: fx cannot trace it

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.out = Gate(), torch.nn.Linear(8, 1)

        def forward(self, x):
            return self.out(self.gate(x)).mean()

    with pytest.raises(UsageError, match=r"Branchy cannot be cut into pipeline stages: .* broke in gate "):
        cuts(Branchy(), stages=2, sample={"x": torch.randn(2, 8)})


def test_a_loss_given_to_prepare_trains_like_one_device(pipeline_run, pipeline_by_data_run):
    """SkipNet returns its predictions; with prepare(..., loss_fn=mse_loss) the loop calls model(x, target=y)
    and the last stage computes the loss of each micro-batch: 1F1B, and pp2 x dp2 on slices of 3 and 2."""
    reference = train("external")
    check(pipeline_run, reference, "external", "1f1b")
    check(pipeline_by_data_run, reference, "external", "dp2-gpipe")
    for _, results in (pipeline_run, pipeline_by_data_run):
        assert results["no_target"] == "prepare() was given a loss_fn: call the model as model(inputs, target=...)"


def test_a_loss_changed_after_the_forward_is_reported(pipeline_run):
    _, results = pipeline_run
    assert results["changed_loss"].startswith(
        "under a pipeline or micro-batches the backward runs inside the model's call"
    )


def test_stages_are_balanced_by_cost():
    from onegpu.planner.stages import balanced_cuts

    assert balanced_cuts([1.0] * 8, stages=2) == [4]
    assert balanced_cuts([1.0] * 8, stages=2, first_extra=0.0, last_extra=4.0) == [6]  # a heavy LM head
    assert balanced_cuts([1.0] * 6, stages=3) == [2, 4]
    model, _ = build("custom")
    assert len(model.blocks) == 3


def test_a_heavy_head_leaves_fewer_blocks_on_the_last_stage():
    """Cuts follow the planner's FLOPs: a large vocabulary's head and loss weigh on the last stage."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def cut(vocab: int) -> list[int]:
        config = LlamaConfig(**decoder_size(8, vocab_size=vocab, hidden_size=64, intermediate_size=128))
        ids = torch.zeros(2, 32, dtype=torch.long)
        return cuts(LlamaForCausalLM(config), stages=2, sample={"input_ids": ids, "labels": ids})

    assert cut(64) == [4]
    assert cut(32000)[0] > 4
