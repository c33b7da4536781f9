"""The models the throughput benchmarks train, each with its batch: the demo model, and a 17M-parameter Llama
whose step shows the runtime's overhead (issue 14), and a 60M-parameter Llama (issue 17's regret workloads).

    llama17m: hidden 384, 6 layers, 6 heads of 64 (no grouped KV), MLP 1024, vocabulary 8192, untied
              head: 16.9M parameters; global batch 16 x 256 tokens.
    llama60m: hidden 640, 10 layers, 10 heads of 64 (no grouped KV), MLP 1792, vocabulary 8192, untied head:
              61.3M parameters; global batch 8 x 128 tokens (a step of a few seconds on 2 CPU workers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from examples.demo_data import GLOBAL_BATCH, SEQ_LEN, TextChunks, demo_model_config, load_tokenizer


@dataclass(frozen=True)
class BenchModel:
    """A Llama of ``size`` (None: the demo model's, with the tokenizer's vocabulary) and its batch."""

    name: str
    seq_len: int
    global_batch: int
    size: dict = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def config(self) -> LlamaConfig:
        if not self.size:
            return demo_model_config(vocab_size=len(load_tokenizer()))
        return LlamaConfig(max_position_embeddings=self.seq_len, tie_word_embeddings=False, **self.size)

    def build(self, *, seed: int = 0) -> LlamaForCausalLM:
        """The model, float32, the same weights for a given seed."""
        torch.manual_seed(seed)
        return LlamaForCausalLM(self.config()).float()

    def dataset(self, *, max_bytes: int | None = None) -> TextChunks:
        """Chunks of the demo corpus (byte tokens, below every vocabulary here)."""
        return TextChunks(seq_len=self.seq_len, tokenizer=load_tokenizer(), max_bytes=max_bytes)

    def loader(self, *, seed: int = 0, batch_size: int | None = None, sampler=None) -> DataLoader:
        """Shuffled global batches (or ``batch_size`` with ``sampler``), the same order on every run."""
        if sampler is not None:
            return DataLoader(sampler.dataset, batch_size=batch_size, sampler=sampler, drop_last=True)
        return DataLoader(
            self.dataset(),
            batch_size=self.global_batch,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
        )


MODELS = {
    "demo": BenchModel(name="demo", seq_len=SEQ_LEN, global_batch=GLOBAL_BATCH),
    "llama17m": BenchModel(
        name="llama17m",
        seq_len=256,
        global_batch=16,
        size=dict(
            vocab_size=8192,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=6,
            intermediate_size=1024,
        ),
    ),
    "llama60m": BenchModel(
        name="llama60m",
        seq_len=128,
        global_batch=8,
        size=dict(
            vocab_size=8192,
            hidden_size=640,
            num_hidden_layers=10,
            num_attention_heads=10,
            num_key_value_heads=10,
            intermediate_size=1792,
        ),
    ),
}
