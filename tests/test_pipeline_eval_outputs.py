"""Under a pipeline, evaluation returns the model's whole output on every worker, as one device does.

In ``torch.no_grad()`` a Hugging Face model under pp=2 (GPipe and 1F1B) and pp=2 x dp=2 returns its
``ModelOutput``: ``.loss`` the global batch's, ``.logits`` this replica's rows in batch order, so an
accuracy computed from them in the loop is the plain process's on those rows; called without labels
it returns the logits with no loss. Under pp=2 x dp=2 the models then generate greedily with the KV cache
(the tokens and logits of one device). Compared with a plain process under the suite's one tolerance policy.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SCALAR_ATOL, SCALAR_RTOL, assert_same_values, launch_script
from scenarios import build, greedy_generation

ROWS = 6


@pytest.fixture(scope="module")
def reference():
    """The plain process's output on the first batch of 6 rows, per model."""
    outputs = {}
    for scenario in ("hf", "gpt2"):
        model, data = build(scenario)
        batch = torch.utils.data.default_collate([data[i] for i in range(ROWS)])
        model.eval()
        with torch.no_grad():
            outputs[scenario] = (batch, model(**batch))
    return outputs


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The worker script's reports on a number of workers (each job launched once)."""
    jobs = {}

    def reports(workers: int) -> list[dict]:
        if workers not in jobs:
            jobs[workers] = launch_script(tmp_path_factory, "pipeline_eval_outputs.py", workers=workers)[1]
        return jobs[workers]

    return reports


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4])
def test_evaluation_returns_the_model_output_on_every_pipeline_worker(launched, reference, workers):
    reports = launched(workers)
    assert len(reports) == workers
    for report in reports:
        for key, seen in report.items():
            if key in ("rank", "generation"):
                continue
            scenario = key.split("-")[0]
            batch, expected = reference[scenario]
            ids = torch.tensor(seen["input_ids"])
            start = next(i for i in range(ROWS) if torch.equal(batch["input_ids"][i : i + len(ids)], ids))
            rows = slice(start, start + len(ids))
            assert len(ids) == ROWS // (workers // 2)  # this replica's rows: all of them, or its half
            assert seen["type"] == type(expected).__name__, key
            assert_same_values(seen["loss"], float(expected.loss), what=f"{key} eval loss (the global batch's)")
            for logits in ("logits", "inference_logits"):
                torch.testing.assert_close(
                    torch.tensor(seen[logits]), expected.logits[rows], rtol=SCALAR_RTOL, atol=SCALAR_ATOL
                )
            assert seen["inference_loss"] is None
            wanted, predicted = batch["labels"][rows, 1:], expected.logits[rows, :-1].argmax(-1)
            counted = wanted != -100
            assert seen["accuracy"] == [int(((predicted == wanted) & counted).sum()), int(counted.sum())], key


@pytest.mark.slow
def test_generation_under_pipeline_and_data_parallelism_matches_one_device(launched):
    """pp=2 x dp=2: greedy generation with the KV cache from left-padded prompts (each replica runs them all),
    and a forward of 3 rows (replicas of 2 and 1, not a multiple of the micro-batches), gathered to all 3."""
    expected = {}
    for scenario in ("hf", "gpt2"):
        expected[f"{scenario}-pp2-dp2"] = greedy_generation(build(scenario)[0], vocab=64)
    for report in launched(4):
        assert set(report["generation"]) == set(expected)
        for key, seen in report["generation"].items():
            assert seen["tokens"] == expected[key]["tokens"].tolist(), key
            for logits in ("step_logits", "forward_logits"):
                torch.testing.assert_close(
                    torch.tensor(seen[logits]), expected[key][logits], rtol=SCALAR_RTOL, atol=SCALAR_ATOL
                )


def test_micro_batch_outputs_join_into_one_of_the_model_type_in_batch_order():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from onegpu.runtime.pipeline_outputs import joined

    logits = torch.randn(6, 3, 5)
    parts = [CausalLMOutputWithPast(loss=torch.tensor(float(i)), logits=logits[2 * i : 2 * i + 2]) for i in range(3)]
    output = joined(parts)
    assert type(output) is CausalLMOutputWithPast and list(output.keys()) == ["loss", "logits"]
    assert torch.equal(output.logits, logits) and float(output.loss) == 1.0  # 0-dim values averaged
    assert joined([(logits[:4], None), (logits[4:], None)])[0].equal(logits)
