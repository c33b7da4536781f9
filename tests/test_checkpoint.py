"""save_pretrained writes a checkpoint a plain process loads, and never leaves half of one behind."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import onegpu


def test_plain_module_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    onegpu.save_pretrained(model, tmp_path / "ckpt")
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    fresh.load_state_dict(load_file(tmp_path / "ckpt" / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_hf_model_with_tied_weights_round_trip(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    onegpu.save_pretrained(model, tmp_path / "gpt2")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    model = torch.nn.Linear(2, 2)
    onegpu.save_pretrained(model, target)
    before = (target / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        (kwargs.get("filename") or args[1]) and open(args[1], "wb").write(b"half")  # a partial file, then death
        raise OSError("disk full")

    monkeypatch.setattr("onegpu.runtime.checkpoint.save_file", crash)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(OSError, match="disk full"):
        onegpu.save_pretrained(model, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial directory left
