"""The plan of a model prepared for inference (no optimizer): replicas when one worker holds the weights, one
forward's activations and the key-value cache; else the fewest tensor-parallel workers that fit; else the fewest
pipeline stages; else FSDP. In one process, on hand-made profiles and a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import onegpu
from onegpu.planner.inference import (
    InferenceWork,
    cache_bytes_per_token,
    choose_inference_plan,
    inference_memory,
    token_sample,
)
from onegpu.planner.memory_model import GPU_RUNTIME_BYTES
from onegpu.planner.profile import ModelProfile, PartProfile

GB = 1e9


def profile(*, blocks: int = 8, block_params: float = 62.5e6, activation_bytes: int = 1_000_000) -> ModelProfile:
    """A model of ``blocks`` blocks of fp32 weights (2 GB in all by default) and a small head."""
    block = PartProfile(params=int(block_params), fwd_flops=1.0, bwd_flops=2.0, activation_bytes=activation_bytes,
                        boundary_bytes=1000)  # fmt: skip
    rest = PartProfile(params=1000, fwd_flops=1.0, bwd_flops=2.0, activation_bytes=1000, boundary_bytes=0)
    return ModelProfile(name="m", seq_len=16, precision="fp32", blocks=(block,) * blocks, rest=rest, param_bytes=4)


def plan_for(budget_gb: float, *, world: int = 4, tp=(1, 2, 4), **work) -> onegpu.Plan:
    work = InferenceWork(profile=work.pop("prof", profile()), tp_degrees=tp, **work)
    return choose_inference_plan(work=work, budget_bytes=int(budget_gb * GB + GPU_RUNTIME_BYTES), world_size=world,
                                 cpu=False)  # fmt: skip


def test_a_model_that_fits_is_replicated_without_communication():
    plan = plan_for(3)
    assert (plan.dp, plan.tp, plan.pp, plan.sharding) == (4, 1, 1, "none")
    assert plan.reason.startswith("inference: replicas,") and "fits the" in plan.reason


def test_weights_over_the_budget_go_to_the_fewest_tensor_parallel_workers_that_fit():
    assert (plan_for(1.5).dp, plan_for(1.5).tp) == (2, 2)  # 1 GB of the weights each
    assert (plan_for(0.7).dp, plan_for(0.7).tp) == (1, 4)  # 0.5 GB each
    assert "tensor parallelism over 2 workers" in plan_for(1.5).reason


def test_without_tensor_parallel_groups_a_pipeline_takes_the_blocks():
    plan = plan_for(1.5, tp=(1,))
    assert (plan.dp, plan.pp, plan.microbatches, plan.tp) == (2, 2, 1, 1)
    assert "a pipeline of 2 stages" in plan.reason


def test_when_no_split_fits_the_weights_are_sharded_over_every_worker():
    plan = plan_for(0.3, tp=(1,))
    assert (plan.dp, plan.sharding) == (4, "parameters")
    assert "no split fits" in plan.reason


def test_the_key_value_cache_counts_and_tensor_parallelism_splits_it():
    small = profile(block_params=1e6)
    cache = dict(prof=small, context=4096, cache_bytes_per_token=2 * 8 * 128 * 4)  # 8 KV heads of 128, fp32
    work = InferenceWork(profile=small, rows=8, context=4096, cache_bytes_per_token=2 * 8 * 128 * 4)
    need = inference_memory(onegpu.Plan(dp=1), work, cpu=False)
    assert need["kv_cache"] == 2 * 8 * 128 * 4 * 8 * 4096 * 8  # bytes per token x blocks x tokens x rows
    assert inference_memory(onegpu.Plan(dp=1, tp=2), work, cpu=False)["kv_cache"] == need["kv_cache"] // 2
    assert plan_for(0.5, rows=1, **cache).tp == 1  # 0.27 GB of cache for one row fits
    assert plan_for(0.5, rows=4, **cache).tp == 4  # four rows' 1.1 GB does not; a quarter of it does


def test_one_worker_says_whether_it_fits():
    assert plan_for(3, world=1).reason.startswith("inference, one worker:")
    assert "exceeds" in plan_for(1, world=1).reason


def test_a_language_model_is_inspected_on_token_ids_and_its_cache_counted_from_its_config():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48))  # fmt: skip
    assert token_sample(model)["input_ids"].shape == (1, 48)
    assert cache_bytes_per_token(model) == 2 * 2 * 8 * 4  # keys and values of 2 KV heads of 8 features, fp32
    assert token_sample(torch.nn.Linear(2, 2)) is None


def test_prepare_without_an_optimizer_logs_the_inference_rule(capsys):
    model = onegpu.prepare(torch.nn.Linear(3, 1))
    assert model.onegpu_plan.reason.startswith("inference, one worker:")
    assert "inference, one worker" in capsys.readouterr().err


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_a_tensor_parallel_layout_splits_positions_only_for_training(with_optimizer):
    from onegpu.api import _describe
    from onegpu.planner.layout import fit_layout

    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48))  # fmt: skip
    description, _ = _describe(model, token_sample(model))
    plan = fit_layout(onegpu.Plan(dp=1, tp=2), description, model=model, inference=not with_optimizer)
    assert plan.tensor_parallel.sequence_parallel is with_optimizer


def test_the_cli_plans_inference_for_a_cluster_you_do_not_have():
    from typer.testing import CliRunner

    from onegpu.cli import app

    def plan(model: str) -> str:
        args = ["plan", "--model", model, "--global-batch-size", "8", "--seq-len", "4096", "--cluster", "h100-80gb",
                "--mixed-precision", "bf16", "--inference"]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return result.stdout

    assert plan("llama3-8b").startswith("Plan: dp=8, sharding=none")  # 16 GB of bf16 weights: replicas
    big = plan("llama3-70b")  # 140 GB of weights: no H100 holds them
    assert big.startswith("Plan: dp=2, tp=4,") and "tensor parallelism over 4 workers" in big
