"""Tiny training runs shared by the plain single-process reference and the onegpu workers.

Every scenario is written once, as single-device code; ``train(..., prepare=onegpu.prepare)``
runs it through onegpu, ``prepare=None`` runs it as plain PyTorch.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

STEPS_PER_EPOCH = 4
BATCH = 5  # uneven over 2 and 3 workers
HF = ("hf", "gpt2", "qwen2", "bert", "hf-odd", "gpt2-odd")  # Hugging Face models: batches are dicts, output.loss
ODD_VOCAB = 257  # the "-odd" scenarios' vocabulary, which no tensor-parallel degree > 1 divides (GPT-2's is 50257)


class PaddedTokens(Dataset):
    """Token sequences of different lengths, padded; padding labels are ignored (-100)."""

    def __init__(self, *, vocab: int = 64, samples: int = 20, seq: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (samples, seq), generator=g)
        self.lengths = torch.randint(3, seq + 1, (samples,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[self.lengths[i] :] = -100
        return {"input_ids": self.ids[i], "labels": labels}


class Pairs(Dataset):
    def __init__(self, *, samples: int = 20, dim: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(samples, dim, generator=g), torch.randn(samples, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x):
        return x + torch.tanh(self.fc(self.norm(x)))


class SkipNet(nn.Module):
    """A hand-written model: a stack of blocks, a skip connection spanning all of them, its own loss."""

    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, 16)
        self.blocks = nn.ModuleList(Block(16) for _ in range(depth))
        self.out = nn.Linear(32, 1)

    def predict(self, x):
        h0 = self.inp(x)
        h = h0
        for block in self.blocks:
            h = block(h)
        return self.out(torch.cat([h, h0], dim=-1))

    def forward(self, x, y=None):
        pred = self.predict(x)
        return pred if y is None else nn.functional.mse_loss(pred, y)


class Tower(nn.Module):
    """A hand-written model without repeated blocks: distinct layers, a skip connection over them, its own loss."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm = nn.Linear(8, 32), nn.LayerNorm(32)
        self.mid, self.narrow, self.out = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(48, 1)

    def forward(self, x, y=None):
        h0 = self.inp(x)
        h = torch.relu(self.narrow(torch.tanh(self.mid(self.norm(h0)))))
        pred = self.out(torch.cat([h, h0], dim=-1))
        return pred if y is None else nn.functional.mse_loss(pred, y)


def checkpointed_blocks(model: nn.Module) -> int:
    """Modules that recompute their activations in backward (torch's composable checkpoint)."""
    from torch.distributed._composable.contract import _get_registry

    return sum("checkpoint" in (_get_registry(m) or {}) for m in model.modules())


def decoder_size(layers: int, **sizes: int) -> dict:
    """A tiny decoder config with grouped-query attention (4 query heads, 2 key/value heads); ``sizes``
    replace its defaults (vocabulary 64, hidden 32, intermediate 64)."""
    return (
        dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        | sizes
    )


def meta_llama(**sizes: int):
    """A Llama (vocabulary 512) built on the meta device: no memory until onegpu materializes it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**decoder_size(sizes.pop("num_hidden_layers"), vocab_size=512, **sizes)))


def write_gathered(report: dict, path: str) -> None:
    """Every worker's ``report``, written by rank 0 as one JSON list (call it on every worker)."""
    import json

    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if dist.get_rank() == 0:
        with open(path, "w") as handle:
            json.dump(gathered, handle)


def build(scenario: str, *, layers: int = 2):
    """The scenario's model (``layers`` blocks; SkipNet has one more) and its data set."""
    torch.manual_seed(0)
    vocab = ODD_VOCAB if scenario.endswith("-odd") else 64
    if scenario in ("hf", "hf-odd"):
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**decoder_size(layers, vocab_size=vocab))), PaddedTokens(vocab=vocab)
    if scenario in ("gpt2", "gpt2-odd"):  # tied input and output embeddings
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=layers,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return GPT2LMHeadModel(config), PaddedTokens(vocab=vocab)
    if scenario == "qwen2":  # grouped-query attention with q/k/v biases
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**decoder_size(layers))), PaddedTokens()
    if scenario == "bert":  # an encoder, masked-LM head tied to the word embeddings
        from transformers import BertConfig, BertForMaskedLM

        config = BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return BertForMaskedLM(config), PaddedTokens()
    if scenario == "tower":
        return Tower(), Pairs()
    return SkipNet(depth=layers + 1), Pairs()


def train(
    scenario: str,
    *,
    prepare=None,
    clip: bool = True,
    evaluate: bool = True,
    layers: int = 2,
    batch: int = BATCH,
    optimizer_class=None,
    autocast=None,
    **how,
) -> dict:
    """Two epochs of single-device training; returns losses, grad norms, eval loss and the model.

    With ``loss_fn`` among ``how`` (for prepare), "external" computes its loss as ``model(x, target=y)``;
    ``optimizer_class`` (lr 1e-2) replaces the scenario's optimizer.
    ``autocast``: a context (``torch.autocast(...)``) the loop runs each training forward in.
    """
    given_loss = "loss_fn" in how
    model, data = build(scenario, layers=layers)
    if optimizer_class is not None:
        optimizer = optimizer_class(model.parameters(), lr=1e-2)
    elif scenario in ("gpt2", "gpt2-odd"):
        # GPT-2's key bias gets a gradient that is zero in exact arithmetic (softmax ignores it); Adam
        # would scale the rounding noise in it to full-size steps, so this model trains with SGD
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1))
    if prepare is not None:
        model, optimizer, loader = prepare(model, optimizer, loader, **how)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    losses, norms, local_sizes = [], [], []
    for _epoch in range(2):
        model.train()
        for batch in loader:
            local_sizes.append(len(batch["input_ids"]) if isinstance(batch, dict) else len(batch[0]))
            with autocast or contextlib.nullcontext():
                if scenario in HF:
                    loss = model(**batch).loss
                elif scenario in ("custom", "tower"):
                    loss = model(*batch)
                else:  # "external": the loss is computed by the user from the model's outputs, or given to prepare
                    x, y = batch
                    loss = model(x, target=y) if given_loss else nn.functional.mse_loss(model(x), y)
            loss.backward()
            if clip:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            losses.append(loss.item())
    eval_loss = None
    if evaluate:
        model.eval()
        with torch.no_grad():
            batch = next(iter(loader))
            if scenario in HF:
                eval_loss = model(**batch).loss
            elif scenario in ("custom", "tower"):
                eval_loss = model(*batch)
            else:
                x, y = batch
                eval_loss = model(x, target=y) if given_loss else nn.functional.mse_loss(model(x), y)
    return {
        "losses": losses,
        "grad_norms": norms,
        "eval_loss": None if eval_loss is None else float(eval_loss),
        "local_batch_sizes": local_sizes,
        "model_class": type(model).__name__,
        "checkpointed_blocks": checkpointed_blocks(model),
        "model": model,
        "loader": loader,
    }


GENERATED = ("tokens", "step_logits", "forward_logits")  # what greedy_generation's tensors are


def greedy_generation(model: nn.Module, *, vocab: int, new_tokens: int = 4, **options) -> dict:
    """What a loop sees of ``model`` (eval mode, no grad) on 3 prompts of 5, 2 and 4 tokens, left-padded with 0
    and masked: the tokens ``generate`` picks greedily with the KV cache (``options``: more of generate's, e.g.
    ``cache_implementation="static"``, ``do_sample=True``), each step's logits, its cache, a forward's logits."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate((5, 2, 4)):
        ids[row, 5 - length :] = torch.randint(1, vocab, (length,), generator=generator)
        mask[row, 5 - length :] = 1
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True, **{"do_sample": False, **options})  # fmt: skip
        forward = model(input_ids=ids, attention_mask=mask).logits
    return {"tokens": out.sequences, "step_logits": torch.stack(out.logits), "forward_logits": forward,
            "cache": out.cache if "cache" in out else out.past_key_values, "prompts": (ids, mask)}  # fmt: skip
