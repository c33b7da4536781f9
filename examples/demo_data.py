"""Data, tokenizer and model for the onegpu demo and benchmarks.

Everything here works offline: the corpus ships in ``examples/data/corpus.txt``
(see ``examples/data/SOURCE.md``), the tokenizer is byte-level ByT5 (no
vocabulary file to download) and the model is a tiny, randomly initialised
Llama.

Typical use::

    tok = load_tokenizer()
    data = TextChunks(seq_len=SEQ_LEN, tokenizer=tok)
    model = build_demo_model(vocab_size=len(tok))
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

DEFAULT_CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"

# Demo hyperparameters shared by the examples and the benchmark baselines.
SEQ_LEN = 128
GLOBAL_BATCH = 16
LR = 1e-3


def load_tokenizer() -> ByT5Tokenizer:
    """Return a byte-level tokenizer (UTF-8 bytes shifted by 3 special ids).

    Use ``len(tokenizer)`` (384) as the model's vocabulary size.
    """
    return ByT5Tokenizer()


class TextChunks(Dataset):
    """Non-overlapping ``seq_len``-token chunks of a text file.

    The whole text is tokenized once; item ``i`` is
    ``{"input_ids": ids, "labels": ids}`` with ``ids`` a ``LongTensor`` of
    shape ``[seq_len]`` (causal LM models shift the labels themselves).
    A trailing partial chunk is dropped.
    """

    def __init__(
        self,
        *,
        seq_len: int,
        tokenizer: ByT5Tokenizer,
        path: str | Path = DEFAULT_CORPUS,
        max_bytes: int | None = None,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        raw = Path(path).read_bytes()
        if max_bytes is not None:
            raw = raw[:max_bytes]
        # errors="ignore" drops a multi-byte character cut by max_bytes.
        text = raw.decode("utf-8", errors="ignore")
        ids = tokenizer.encode(text, add_special_tokens=False)
        self.seq_len = seq_len
        self.ids = torch.tensor(ids, dtype=torch.long)

    def __len__(self) -> int:
        return self.ids.numel() // self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        start = index * self.seq_len
        chunk = self.ids[start : start + self.seq_len]
        return {"input_ids": chunk, "labels": chunk}


def demo_model_config(*, vocab_size: int) -> LlamaConfig:
    """Config of the tiny Llama used by the demo (about 0.84M parameters)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=352,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def build_demo_model(*, vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """Randomly initialised float32 tiny Llama, reproducible for a given seed."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(demo_model_config(vocab_size=vocab_size)).float()
