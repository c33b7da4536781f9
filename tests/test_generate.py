"""Inference on the virtual device: ``model.generate`` (greedy, with the KV cache) and plain forwards give one
device's tokens (exactly) and logits (the suite's tolerance policy) under replicas, ZeRO, FSDP, hybrid sharding,
tensor parallelism (tp=2, tp=2 x dp=2) and the plan ``prepare(model)`` chooses; for Llama and GPT-2 (fused qkv,
tied embeddings, a vocabulary of 101 that tp pads), left-padded prompts with an attention mask, 3 rows on 2
replicas and a single row (under replicas also without the cache: forwards sliced by rows and gathered). A
model prepared for training under tensor and sequence parallelism generates after ``eval()``; a model whose
weights do not fit one worker's budget is split by ``prepare(model)`` and generates (tensor parallelism), or,
without tensor-parallel structure, generates in the pipeline it is cut into. On 4 workers: pp=2 x tp=2, and
each tensor-parallel group of tp=2 x dp=2 serving its own share of prompts (``split_between_replicas``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import PARAMETER_ATOL, SCALAR_RTOL, launch_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch_script(tmp_path_factory, "generate_plans.py", workers=2)[1]


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return launch_script(tmp_path_factory, "generate_plans.py", workers=4)[1]


def assert_like_one_device(result: dict) -> None:
    assert result["tokens"], f"generated tokens differ from one device's under {result['plan']}"
    logits, want = torch.tensor(result["logits"]), torch.tensor(result["want_logits"])
    torch.testing.assert_close(logits, want, rtol=SCALAR_RTOL, atol=PARAMETER_ATOL)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("plan", ["ddp", "fsdp", "tp", "chosen"])
def test_generate_and_forward_give_one_device_s_tokens_and_logits(two, kind, plan):
    assert_like_one_device(two[f"{kind} {plan}"])


def test_zero_sharding_generates_like_one_device(two):
    assert_like_one_device(two["llama zero1"])


def test_prepare_without_an_optimizer_replicates_a_model_that_fits(two):
    assert two["llama chosen"]["plan"] == two["gpt2 chosen"]["plan"] == "dp=2, sharding=none, fp32"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_model_trained_with_sequence_parallelism_generates_after_eval(two, kind):
    result = two[f"{kind} trained-tp"]
    assert result["sequence_parallel"]  # the training layout: prompts of 6 tokens split, decoding steps of 1 not
    assert_like_one_device(result)


def test_cache_position_as_long_as_the_batch_is_not_cut_as_rows(two):
    assert two["positions"]["equal"]


def test_a_model_too_big_for_one_worker_is_split_and_generates(two):
    result = two["too big"]
    assert result["plan"] == "dp=1, tp=2, sharding=none, fp32"
    assert 0.45 < result["local_share"] < 0.55  # each worker holds half the weights (the vocabulary's padding aside)
    assert_like_one_device(result)


def test_a_model_too_big_without_tensor_parallel_structure_is_cut_into_a_pipeline(two):
    result = two["too big, no tp"]
    assert result["plan"] == "dp=1, pp=2 (gpipe, 1 micro-batches), sharding=none, fp32"
    assert 0.4 < result["local_share"] < 0.6  # two blocks each, and the embedding or the head
    assert_like_one_device(result)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("plan", ["tp-dp", "hybrid", "pp-tp"])
def test_tensor_parallel_replicas_hybrid_sharding_and_pipelines_of_tp_groups_generate_like_one_device(four, kind, plan):
    assert_like_one_device(four[f"{kind} {plan}"])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_each_tensor_parallel_group_serves_its_own_share_of_prompts(four, kind):
    assert four[f"{kind} tp-dp"]["served"]
