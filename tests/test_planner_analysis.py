"""Model analysis on the meta device: exact parameter counts, FLOPs as the textbook formula, nothing allocated."""

import resource

import pytest
import torch
from transformers import LlamaConfig

from onegpu.errors import UsageError
from onegpu.planner.analysis import analyze

TINY = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    TINY.save_pretrained(path)
    return path


def test_parameters_are_counted_exactly(tiny_dir):
    from transformers import LlamaForCausalLM

    profile = analyze(str(tiny_dir), seq_len=32)
    assert profile.params == sum(p.numel() for p in LlamaForCausalLM(TINY).parameters())
    assert len(profile.blocks) == 3


def test_flops_follow_six_n_plus_attention(tiny_dir):
    seq = 32
    profile = analyze(str(tiny_dir), seq_len=seq)
    linear_params = profile.params - TINY.vocab_size * TINY.hidden_size  # the embedding lookup is not a matmul
    attention = 3 * 4 * seq * seq * TINY.hidden_size * TINY.num_hidden_layers  # QK^T and AV, forward + 2x backward
    assert profile.flops_per_sample == pytest.approx(6 * linear_params * seq + attention, rel=0.02)
    block = profile.blocks[0]
    assert block.bwd_flops == pytest.approx(2 * block.fwd_flops, rel=0.05)


def test_a_checkpointed_block_keeps_exactly_its_input(tiny_dir):
    profile = analyze(str(tiny_dir), seq_len=32, precision="bf16")
    block = profile.blocks[0]
    assert block.boundary_bytes == 32 * TINY.hidden_size * 2  # one sample's hidden states in bf16
    assert block.activation_bytes > 10 * block.boundary_bytes


def test_a_plain_module_with_a_sample():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x.sum()

    profile = analyze(Net(), seq_len=1, sample=torch.randn(1, 16))
    assert [b.params for b in profile.blocks] == [272] * 4
    assert profile.blocks[0].fwd_flops == 2 * 16 * 16


def test_a_trillion_parameter_preset_is_analysed_without_allocating():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    profile = analyze("llama-1t", seq_len=2048, precision="bf16")
    assert 0.95e12 < profile.params < 1.1e12
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500 * 1024  # KiB: under 500 MB


@pytest.mark.parametrize("name", ["llama3-8b", "llama3-70b", "llama2-13b", "gpt2", "gpt2-xl"])
def test_presets_have_their_published_sizes(name):
    expected = {"llama3-8b": 8.03e9, "llama3-70b": 70.6e9, "llama2-13b": 13.0e9, "gpt2": 124e6, "gpt2-xl": 1.56e9}
    assert analyze(name, seq_len=128).params == pytest.approx(expected[name], rel=0.02)


def test_unknown_model_names_the_presets():
    with pytest.raises(UsageError, match="neither a preset .*llama3-8b.* nor a config.json"):
        analyze("llama9-1b", seq_len=8)
