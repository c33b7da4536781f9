"""Tensor parallelism found in the model's data flow trains like one device.

Llama (grouped-query attention), Qwen2 (q/k/v biases), GPT-2 (fused qkv in a transposed Conv1D,
tied embeddings) and BERT (an encoder with a tied masked-LM head), each with tp=2; Llama and GPT-2
with a vocabulary of 257 that 2 does not divide; Llama and GPT-2 (both vocabularies) with tp=2 x
dp=2 and tp=2 x pp=2; Llama with tp=2 x pp=2 x dp=2 on 8 workers. Each gives the same per-step
losses, gradient norms, eval loss and final parameters as the plain single process, under the
suite's one tolerance policy (tests/conftest.py). A model without the structure gets none.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_training, launch_script
from scenarios import ODD_VOCAB, build, train
from test_single_device_equivalence import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    return launch_script(tmp_path_factory, "train_tensor_parallel.py", workers=2)


@pytest.fixture(scope="module")
def tp_dp_run(tmp_path_factory):
    return launch_script(tmp_path_factory, "train_tensor_parallel.py", workers=4)


@pytest.fixture(scope="module")
def tp_pp_dp_run(tmp_path_factory):
    return launch_script(tmp_path_factory, "train_tensor_parallel.py", workers=8)


@pytest.fixture(scope="module")
def reference():
    return {s: train(s) for s in ("hf", "qwen2", "gpt2", "bert", "hf-odd", "gpt2-odd")}


@pytest.mark.parametrize("scenario", ["hf", "qwen2", "gpt2", "bert"])
def test_tensor_parallel_trains_like_one_device(tp_run, reference, scenario):
    check(tp_run, reference[scenario], scenario, "tp2")


def test_selective_recomputation_under_tensor_parallelism_trains_like_one_device(tp_run, reference):
    """Every block recomputes its cheap operators, keeping its matmul outputs and the sequence-parallel
    reductions' (not run again), with the layouts' input and output hooks inside the recomputed region."""
    check(tp_run, reference["hf"], "hf", "tp2-selective")
    assert tp_run[1]["hf-tp2-selective"]["checkpointed_blocks"] == 2


@pytest.mark.parametrize("scenario", ["hf-odd", "gpt2-odd"])
def test_a_vocabulary_tp_does_not_divide_trains_like_one_device(tp_run, reference, scenario):
    """257 tokens over 2 workers: the embedding and head padded to 258 rows, split; the logits, the loss and
    the checkpoint (a plain model of 257 tokens loads it) are the model's own. GPT-2's head is tied."""
    check(tp_run, reference[scenario], scenario, "tp2")
    assert tp_run[1][f"{scenario}-tp2"]["logits_vocabulary"] == ODD_VOCAB


@pytest.mark.parametrize("scenario", ["hf", "gpt2", "gpt2-odd"])
def test_tensor_parallel_times_data_parallel_trains_like_one_device(tp_dp_run, reference, scenario):
    check(tp_dp_run, reference[scenario], scenario, "tp2-dp2")
    assert tp_dp_run[1][f"{scenario}-tp2-dp2"]["local_batch_sizes"] == [3] * 8  # replica 0's slice, on both its ranks


@pytest.mark.parametrize("scenario", ["hf", "gpt2", "gpt2-odd"])
def test_tensor_parallel_times_pipeline_trains_like_one_device(tp_dp_run, reference, scenario):
    """Each of 2 stages split over 2 workers; GPT-2's tied embedding and head, on different stages, both split."""
    check(tp_dp_run, reference[scenario], scenario, "tp2-pp2")


def test_tensor_pipeline_and_data_parallel_on_one_mesh_train_like_one_device(tp_pp_dp_run, reference):
    """8 workers: replicas of 3 and 2 rows, each a 2-stage pipeline whose stages are split over 2 workers."""
    check(tp_pp_dp_run, reference["hf"], "hf", "tp2-pp2-dp2")


def test_a_model_without_the_structure_gets_none(tp_run, tp_dp_run):
    for _, results in (tp_run, tp_dp_run):
        assert results["no_structure"] == (
            "SkipNet has no tensor-parallel structure (no linear layers of Block feed only one other linear "
            "layer): use tp=1"
        )


def check(launched, reference, scenario: str, name: str) -> None:
    out, results = launched
    run = results[f"{scenario}-{name}"]
    # blocks, embedding and head are split (GPT-2's larger odd vocabulary: both stages hold half of it)
    assert run["held"] < (0.6 if "pp2" not in name else 0.4 if scenario.endswith("-odd") else 0.35)
    if "pp2" not in name:  # sequence parallelism: between the groups, each worker handles half the positions
        assert run["sequence_parallel"] == (scenario != "bert")  # BERT's residual is inside its attention module
        assert run["norm_positions"] == (6 if scenario != "bert" else 12)
    trained = load_checkpoint("hf", out / f"{scenario}-{name}")  # a plain model of the saved class and size
    assert_same_training(run, reference, trained=trained)


def test_the_structure_is_found_in_the_data_flow_of_four_families():
    """Column layers feeding one row layer, heads that divide, the vocabulary-parallel embedding and head."""
    from onegpu.planner.inspection import describe

    ids = torch.randint(0, 64, (1, 12))

    def layout(scenario: str, tp: int):
        return describe(
            build(scenario)[0], sample={"input_ids": ids, "labels": ids}, seq_len=12
        ).tensor_parallel.layout(tp)

    expected = {
        "hf": ({"self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"}, "self_attn.o_proj", "lm_head"),
        "qwen2": ({"self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"}, "self_attn.o_proj", "lm_head"),
        "gpt2": ({"attn.c_attn"}, "attn.c_proj", "lm_head"),
        "bert": (
            {"attention.self.key", "attention.self.query", "attention.self.value"},
            "attention.output.dense",
            "cls.predictions.decoder",
        ),
    }
    for scenario, (attention, row, head) in expected.items():
        found, reasons = layout(scenario, 2)
        assert len(found.groups) == 2, (scenario, reasons)
        first = found.groups[0]
        assert (set(first.columns), first.row) == (attention, row)
        assert found.head == head and found.embedding is not None
    gpt2, _ = layout("gpt2", 2)
    assert gpt2.groups[0].parts == (("attn.c_attn", 3),) and gpt2.groups[0].heads == 4  # fused q, k, v
    _, reasons = layout("hf", 3)
    assert any("cannot be divided among 3 workers" in reason for reason in reasons)
