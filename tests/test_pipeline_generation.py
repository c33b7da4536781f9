"""Under a pipeline, ``model.generate`` with the KV cache and forward passes give what one device gives.

A 4-block Llama and GPT-2 (tied embeddings), vocabulary 257, generate greedily from 3 left-padded prompts
of different lengths (3 rows: not a multiple of the 2 micro-batches), under pp=2 with GPipe, 1F1B and
interleaved 1F1B (two stages per worker) on 2 workers. Every worker's loop sees the plain process's tokens,
exactly (with a dynamic cache and a static one), and its logits (each generation step's, a masked forward's,
a 4-row forward's) under the suite's tolerance policy. Memory stays split: each worker holds about half the weights, and its cache holds keys
for its own layers only (the others' keep one placeholder value per token, which counts the tokens). A
hand-written model's batch of 3 rows, which 2 micro-batches cannot cut, gives the plain process's output.
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
    model, data = build("custom", layers=3)
    with torch.no_grad():
        outputs["custom"] = model(data.x[:3])
    return outputs


@pytest.mark.slow
def test_pipelined_generation_and_forward_match_one_device(tmp_path_factory, reference):
    _, reports = launch_script(tmp_path_factory, "pipeline_generation.py", workers=2)
    assert len(reports) == 2
    for report in reports:
        for scenario in SCENARIOS:
            expected = reference[scenario]
            for plan in PLANS:
                key = f"{scenario}-{plan}"
                seen = report[key]
                assert seen["tokens"] == expected["tokens"].tolist(), key
                assert seen["static_cache_tokens"] == expected["static_cache_tokens"].tolist(), key
                for logits in ("step_logits", "forward_logits", "four_row_logits"):
                    torch.testing.assert_close(
                        torch.tensor(seen[logits]), expected[logits], rtol=SCALAR_RTOL, atol=SCALAR_ATOL
                    )
                assert seen["cache_length"] == expected["cache"].get_seq_length(), key
                own = [shape for shape in seen["cache_keys"] if shape[-1] > 1]
                assert len(own) == 2 and len(seen["cache_keys"]) == 4, key  # keys for its 2 layers of 4
                assert all(shape == list(expected["cache"].layers[0].keys.shape) for shape in own), key
                assert 0.45 < seen["held"] / expected["held"] < 0.6, key  # about half the weights
        output = torch.tensor(report["custom-pp2-gpipe"])  # a hand-written model's batch of 3 in 2 micro-batches
        torch.testing.assert_close(output, reference["custom"], rtol=SCALAR_RTOL, atol=SCALAR_ATOL)
