"""Under a pipeline, ``model.generate`` with the KV cache and forward passes give what one device gives.

A 4-block Llama and GPT-2 (tied embeddings), vocabulary 257, generate greedily from 3 left-padded prompts
of different lengths (3 rows: not a multiple of the 2 micro-batches), under pp=2 with GPipe, 1F1B and
interleaved 1F1B (two stages per worker) on 2 workers. Every worker's loop sees the plain process's tokens,
exactly (with a dynamic cache and a static one), and its logits (each generation step's, a masked forward's,
a 4-row forward's) under the suite's tolerance policy. Memory stays split: each worker holds about half the weights, and its cache holds keys
for its own layers only (the others' keep one placeholder value per token, which counts the tokens). A
hand-written model's batch of 3 rows, which 2 micro-batches cannot cut, gives the plain process's output.
A Llama built on the meta device (never whole on a worker) generates as its saved weights do in one process.
Sampling picks the same tokens on every worker (and, seeded, one device's).
pp=2 x dp=2 generation is checked in the 4-worker job of test_pipeline_eval_outputs.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SCALAR_ATOL, SCALAR_RTOL, launch_script
from scenarios import ODD_VOCAB, build, greedy_generation

SCENARIOS = ("hf-odd", "gpt2-odd")
PLANS = ("pp2-gpipe", "pp2-1f1b", "pp2-interleaved")


@pytest.fixture(scope="module")
def reference():
    """The plain process's generation, forwards and parameter count, per model."""
    outputs = {}
    for scenario in SCENARIOS:
        model = build(scenario, layers=4)[0]
        seen = greedy_generation(model, vocab=ODD_VOCAB)
        ids, _ = seen["prompts"]
        with torch.no_grad():
            seen["four_row_logits"] = model(input_ids=torch.cat([ids, ids[:1]])).logits
        seen["held"] = sum(p.numel() for p in model.parameters())
        seen["static_cache_tokens"] = greedy_generation(model, vocab=ODD_VOCAB, cache_implementation="static")["tokens"]
        outputs[scenario] = seen
    torch.manual_seed(7)
    outputs["sampled"] = greedy_generation(model, vocab=ODD_VOCAB, do_sample=True)["tokens"]
    model, data = build("custom", layers=3)
    with torch.no_grad():
        outputs["custom"] = model(data.x[:3])
    return outputs


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The 2-worker job: its output directory and every worker's report."""
    out, reports = launch_script(tmp_path_factory, "pipeline_generation.py", workers=2)
    assert len(reports) == 2
    return out, reports


def runs(reports: list[dict]):
    """Every worker's run of every model under every plan, with its key."""
    for report in reports:
        for scenario in SCENARIOS:
            for plan in PLANS:
                yield scenario, f"{scenario}-{plan}", report[f"{scenario}-{plan}"]


def assert_close(seen: list, expected: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(seen), expected, rtol=SCALAR_RTOL, atol=SCALAR_ATOL)


@pytest.mark.slow
def test_generate_and_forward_give_the_tokens_and_logits_of_one_device(launched, reference):
    for scenario, key, seen in runs(launched[1]):
        expected = reference[scenario]
        assert seen["tokens"] == expected["tokens"].tolist(), key
        assert seen["static_cache_tokens"] == expected["static_cache_tokens"].tolist(), key
        for logits in ("step_logits", "forward_logits", "four_row_logits"):
            assert_close(seen[logits], expected[logits])


@pytest.mark.slow
def test_sampling_picks_the_same_tokens_on_every_worker(launched, reference):
    reports = launched[1]
    assert all(report["sampled"] == reference["sampled"].tolist() for report in reports)  # seeded: one device's
    assert reports[0]["sampled_unseeded"] == reports[1]["sampled_unseeded"]  # streams moved apart: taken from one


@pytest.mark.slow
def test_each_worker_holds_half_the_weights_and_the_cache_of_its_layers_only(launched, reference):
    for scenario, key, seen in runs(launched[1]):
        expected = reference[scenario]
        assert 0.45 < seen["held"] / expected["held"] < 0.6, key  # GPT-2's tied embedding: on both stages
        assert seen["cache_length"] == expected["cache"].get_seq_length(), key
        own = [shape for shape in seen["cache_keys"] if shape[-1] > 1]  # the others': (rows, 1, tokens, 1)
        assert len(own) == 2 and len(seen["cache_keys"]) == 4, key
        assert all(shape == list(expected["cache"].layers[0].keys.shape) for shape in own), key


@pytest.mark.slow
def test_a_model_built_on_meta_generates_as_its_saved_weights_do_in_one_process(launched):
    from transformers import LlamaForCausalLM

    out, reports = launched
    saved = LlamaForCausalLM.from_pretrained(out / "meta-llama")  # what the workers held, as one plain model
    whole = greedy_generation(saved, vocab=512)
    for report in reports:
        seen = report["meta-pp2-gpipe"]
        assert seen["tokens"] == whole["tokens"].tolist()
        assert_close(seen["step_logits"], whole["step_logits"])
        assert "meta" not in seen["held_on"]  # each worker materialized its stage
        assert 0.45 < seen["held"] / sum(p.numel() for p in saved.parameters()) < 0.6


@pytest.mark.slow
def test_a_batch_the_micro_batches_cannot_cut_runs_whole_under_no_grad(launched, reference):
    for report in launched[1]:  # a hand-written model (no cache): 3 rows, 2 micro-batches
        assert_close(report["custom-pp2-gpipe"], reference["custom"])
