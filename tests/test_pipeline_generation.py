"""Under a pipeline, ``model.generate`` with the KV cache and forward passes give what one device gives.

Llama and GPT-2 (tied embeddings, a vocabulary of 101) generate greedily from 3 left-padded prompts of
different lengths (not a multiple of the 2 micro-batches): pp=2 under GPipe, 1F1B and interleaved 1F1B
(two stages per worker) on 2 workers, pp=2 x dp=2 on 4. Every worker's loop sees the one device's tokens,
exactly, and its logits (each generation step's, a masked forward's, a 4-row forward's) under the suite's
tolerance policy; each worker holds about half the weights, and its cache holds keys for its own layers
only (the others' keep placeholders that count tokens).
"""

from __future__ import annotations

import pytest
import torch
from conftest import SCALAR_ATOL, SCALAR_RTOL, launch_script

MODELS = ("llama", "gpt2")
LAYERS = 4


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4])
def test_pipelined_generation_and_forward_match_one_device(tmp_path_factory, workers):
    _, reports = launch_script(tmp_path_factory, "pipeline_generation.py", workers=workers)
    assert len(reports) == workers
    for report in reports:
        for model in MODELS:
            reference = report[f"{model}-reference"]
            plans = [key for key in report if key.startswith(f"{model}-pp2")]
            assert len(plans) == (3 if workers == 2 else 1)
            for key in plans:
                seen = report[key]
                assert seen["tokens"] == reference["tokens"], key
                for logits in ("step_logits", "forward_logits", "four_row_logits"):
                    torch.testing.assert_close(
                        torch.tensor(seen[logits]),
                        torch.tensor(reference[logits]),
                        rtol=SCALAR_RTOL,
                        atol=SCALAR_ATOL,
                        msg=lambda message, key=key, logits=logits: f"{key} {logits}: {message}",
                    )
                assert seen["cache_length"] == reference["cache_length"], key
                assert reference["cache_layers_with_keys"] == LAYERS
                assert seen["cache_layers_with_keys"] == LAYERS // 2, key  # its stage's layers, not the others'
                assert 0.45 < seen["held"] / reference["held"] < 0.6, key  # about half the weights
