"""Worker script: greedy generation with the KV cache, and forward passes, under pipeline plans.

A tiny Llama and a tiny GPT-2 (tied embeddings, a vocabulary of 101), built from configs, get 3 prompts of
different lengths, left-padded with an attention mask (3 rows: not a multiple of the 2 micro-batches). Each
is run once as one device runs it (the reference, on this worker, before ``prepare``) and once under each
plan: ``generate`` (tokens and every step's logits), a forward pass with the mask, and a forward pass of 4
rows (which the schedule runs in micro-batches). Every worker reports what its loop saw, the share of the
weights it holds and how many of its cache's layers hold keys; rank 0 writes them all to results.json.
2 workers: pp=2 under GPipe, 1F1B and interleaved 1F1B (4 stages); 4 workers: pp=2 x dp=2.
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import onegpu
from onegpu.plan import Plan

NEW_TOKENS = 4
out = Path(sys.argv[1])
workers = int(os.environ["WORLD_SIZE"])
if workers == 2:
    plans = {
        "pp2-gpipe": Plan(dp=1, pp=2, microbatches=2, schedule="gpipe"),
        "pp2-1f1b": Plan(dp=1, pp=2, microbatches=2, schedule="1f1b"),
        "pp2-interleaved": Plan(dp=1, pp=2, microbatches=2, schedule="interleaved"),
    }
else:
    plans = {"pp2-dp2": Plan(dp=2, pp=2, microbatches=1, schedule="gpipe")}  # replicas of 2 and 1 rows


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=4, n_head=4))
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """3 prompts of 5, 2 and 4 tokens, left-padded with 0, and their attention mask."""
    generator = torch.Generator().manual_seed(1)
    lengths, width = (5, 2, 4), 5
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(1, 90, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def run(model: torch.nn.Module) -> dict:
    """What a loop sees: generated tokens, each step's logits, the forward's logits on 3 and on 4 rows."""
    ids, mask = prompts()
    model.eval()
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=0, return_dict_in_generate=True, output_logits=True)  # fmt: skip
        forward = model(input_ids=ids, attention_mask=mask).logits
        four = model(input_ids=torch.cat([ids, ids[:1]])).logits
    cache = generated.past_key_values
    layers = [layer for layer in getattr(cache, "self_attention_cache", cache).layers]
    return {
        "tokens": generated.sequences.tolist(),
        "step_logits": [step.tolist() for step in generated.logits],
        "forward_logits": forward.tolist(),
        "four_row_logits": four.tolist(),
        "cache_layers_with_keys": sum(layer.keys.shape[-1] > 1 for layer in layers),
        "cache_length": cache.get_seq_length(),
        "held": sum(p.numel() for p in model.parameters()),
    }


report = {"rank": int(os.environ["RANK"])}
for kind in ("llama", "gpt2"):
    reference = build(kind)
    report[f"{kind}-reference"] = run(reference) | {"held": sum(p.numel() for p in reference.parameters())}
    for name, plan in plans.items():
        report[f"{kind}-{name}"] = run(onegpu.prepare(build(kind), plan=plan))

gathered = [None] * workers
torch.distributed.all_gather_object(gathered, report)
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps(gathered))
