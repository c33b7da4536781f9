"""A hand-written language model whose forward returns its loss in every shape people use, and the
single-device loop that trains it: shared by the plain single-process reference and the onegpu workers.

``train(shape, prepare=onegpu.prepare, ...)`` runs it through onegpu, ``prepare=None`` as plain PyTorch.
"""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

SHAPES = ("tensor", "model_output", "dataclass", "dict", "tuple_loss_first", "tuple_loss_last", "namedtuple")
STEPS = 3
SEQ, VOCAB = 8, 64
Named = namedtuple("Named", "logits loss")


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


def shaped(shape: str, logits: torch.Tensor, loss: torch.Tensor):
    """The model's output in ``shape``: the loss and the logits it was computed from."""
    if shape == "tensor":
        return loss
    if shape == "model_output":
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(loss=loss, logits=logits)
    return {
        "dataclass": lambda: Output(logits=logits, loss=loss),
        "dict": lambda: {"loss": loss, "logits": logits},
        "tuple_loss_first": lambda: (loss, logits),
        "tuple_loss_last": lambda: (logits, loss),  # nanoGPT's
        "namedtuple": lambda: Named(logits, loss),
    }[shape]()


def loss_in(shape: str, output) -> torch.Tensor:
    """The loss, taken from the output as a user of that shape takes it."""
    if shape == "tensor":
        return output
    if shape == "dict":
        return output["loss"]
    if shape == "tuple_loss_first":
        return output[0]
    if shape == "tuple_loss_last":
        _logits, loss = output
        return loss
    return output.loss


class TinyLM(nn.Module):
    """A tiny Llama decoder under a hand-written forward that computes its own token loss (nanoGPT-like:
    ``forward(idx, targets=None)``, ``ignore_index``)."""

    def __init__(self, *, shape: str = "tensor", ignore_index: int = -1) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
        )  # fmt: skip
        config._attn_implementation = "eager"  # plain matmuls: its masks need no data on the meta device
        self.decoder = LlamaForCausalLM(config)
        self.shape, self.ignore_index = shape, ignore_index

    def forward(self, idx, targets=None):
        features = self.decoder.model(input_ids=idx, attention_mask=torch.ones_like(idx)).last_hidden_state
        logits = self.decoder.lm_head(features)
        if targets is None:  # "features": the logits and the features they are made from
            return {"features": features, "logits": logits} if self.shape == "features" else logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=self.ignore_index)
        return shaped(self.shape, logits, loss)


class Tokens(Dataset):
    """Random token sequences and targets; with ``ignored``, a varying number of each sample's targets are -1."""

    def __init__(self, *, samples: int, ignored: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.idx = torch.randint(0, VOCAB, (samples, SEQ), generator=g)
        self.targets = torch.randint(0, VOCAB, (samples, SEQ), generator=g)
        if ignored:  # sample i keeps its first 1 + (i * 5) % SEQ targets
            for i in range(samples):
                self.targets[i, 1 + (i * 5) % SEQ :] = -1

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int):
        return self.idx[i], self.targets[i]


def train(shape: str = "tensor", *, prepare=None, batch: int = 7, ignored: bool = False, **how) -> dict:
    """STEPS steps of single-device training and one evaluation; returns losses, gradient norms, eval loss, model."""
    model = TinyLM(shape=shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(Tokens(samples=batch * STEPS, ignored=ignored), batch_size=batch)
    if prepare is not None:
        model, optimizer, loader = prepare(model, optimizer, loader, **how)
    losses, norms = [], []
    model.train()
    for idx, targets in loader:
        loss = loss_in(shape, model(idx, targets))
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        idx, targets = next(iter(loader))
        eval_loss = loss_in(shape, model(idx, targets)).item()
    return {"losses": losses, "grad_norms": norms, "eval_loss": eval_loss, "model": model}


def train_on_features(*, prepare=None, **how) -> nn.Module:
    """A model returning features and the logits made from them, both in the loss the loop computes."""
    model = TinyLM(shape="features")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(Tokens(samples=14), batch_size=7)
    if prepare is not None:
        model, optimizer, loader = prepare(model, optimizer, loader, **how)
    for idx, targets in loader:
        output = model(idx)
        features, logits = output["features"], output["logits"]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()) + features.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def accuracy(*, prepare=None, gather=lambda value: value, **how) -> dict:
    """The share of targets the model predicts over two batches, computed in the loop (``gather``: the whole
    batch's hits from each worker's); the rows seen per batch, and the batches' inputs as gathered."""
    model = TinyLM()
    loader = DataLoader(Tokens(samples=14), batch_size=7)
    if prepare is not None:
        model, loader = prepare(model, loader, **how)
    hits, rows, batches = 0, [], []
    with torch.no_grad():
        for idx, targets in loader:
            correct = gather(model(idx).argmax(-1) == targets)
            hits += int(correct.sum())
            rows.append(len(correct))
            batches.append(gather({"idx": idx})["idx"].tolist())
    return {"accuracy": hits / (sum(rows) * SEQ), "rows": rows, "batches": batches}
