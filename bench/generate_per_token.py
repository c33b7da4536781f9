"""Greedy generation with the KV cache under each plan: milliseconds per token, against one process in the same run.

    onegpu run --workers 2 bench/generate_per_token.py [ROWS]

A 40M-parameter Llama (32,000 tokens, 4 blocks of 512 features) generates 16 tokens for ROWS prompts (default 4)
of 16 tokens, first unprepared in every worker (the one-device reference), then prepared with no optimizer under
replicas, FSDP and tp=2. Rank 0 prints each plan's median ms/token over 3 runs, its ratio to the reference's,
the parameter bytes each worker holds, and whether the tokens equal the reference's. The workers share the
machine's cores: the reference runs on every worker at once, as the plans do.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import onegpu
from onegpu.plan import Plan

NEW_TOKENS = 16


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def per_token(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The tokens, and the median seconds per token of 3 runs (after one to warm up)."""
    seconds = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        for _ in range(3):
            start = time.perf_counter()
            tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                    pad_token_id=0)  # fmt: skip
            seconds.append((time.perf_counter() - start) / NEW_TOKENS)
    return tokens, statistics.median(seconds)


def local_mib(model: torch.nn.Module) -> float:
    held = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in held) / 2**20


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    torch.manual_seed(1)
    ids = torch.randint(0, 32000, (rows, 16))
    reference = build()
    want, one = per_token(reference, ids)
    plans = {"replicas": Plan(dp=2), "fsdp": Plan(dp=2, sharding="parameters"), "tp=2": Plan(dp=1, tp=2)}
    for name, plan in plans.items():
        model = onegpu.prepare(build(), plan=plan).eval()
        tokens, seconds = per_token(model, ids)
        if onegpu.is_main_process():
            print(f"{name}: {seconds * 1e3:.1f} ms/token, one process {one * 1e3:.1f} (x{seconds / one:.2f}), "
                  f"{local_mib(model):.1f} of {local_mib(reference):.1f} MiB of parameters per worker, "
                  f"tokens equal: {torch.equal(tokens, want)}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
