"""Greedy completions of a list of prompts, a batch at a time: plain Hugging Face code, for one device or for a
replica of the virtual device alike (examples/serve.py, examples/generate.py, bench/serve.py).

Prompts of different lengths share a batch with left padding and an attention mask, so each row's new tokens
start at the same column; generation uses the KV cache.
"""

from __future__ import annotations

import torch


def complete_ids(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """Each prompt's new token ids (greedy, up to ``max_new_tokens``; ended at the end-of-text token)."""
    tokenizer.padding_side = "left"
    completions: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            prompts[start : start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt"
        ).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            ended = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
            completions.append(row[:ended])
    return completions


def decode(tokenizer, ids: list[list[int]]) -> list[str]:
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
