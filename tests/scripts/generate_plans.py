"""Worker script: greedy generation with the KV cache and plain forwards under several plans; rank 0 writes
results.json.

Every worker computes the one-device reference itself, on an unprepared copy built from the same seed, before
preparing. Prompts are 3 rows (2 and 1 of them left-padded, with an attention mask) on 2 workers, and a single
row. 2 workers: Llama and GPT-2 (fused qkv, tied embeddings, a vocabulary of 101 that tp pads) under
replicas, FSDP, tp=2, the plan prepare() chooses, and tp=2 with sequence parallelism prepared WITH an optimizer
then switched to eval; a hand-written model given ``cache_position`` as long as the batch; a Llama whose
weights do not fit the budget, and one without tensor-parallel structure (under the pipeline
prepare() cuts, generating). 4 workers: tp=2 x dp=2 (replicas of 2 and 1 rows; each group serving its own share
of prompts), hybrid sharding, and pp=2 x tp=2.
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import onegpu
from onegpu.plan import Plan
from onegpu.planner.memory_model import CPU_RUNTIME_BYTES

out = Path(sys.argv[1])
world = int(os.environ.get("WORLD_SIZE", "1"))
NEW_TOKENS = 4


def build(kind: str, **sizes) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                            eos_token_id=2)  # fmt: skip
        return GPT2LMHeadModel(config)
    config = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**{**config, **sizes}))


def prompts() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = mask[2, :1] = 0  # left padding: rows of 4, 6 and 5 tokens
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One forward's logits and generate's tokens, for the batch and for its first row alone."""
    with torch.no_grad():
        logits = model(**batch).logits
        tokens = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        one = model.generate(batch["input_ids"][1:2], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return {"logits": logits, "tokens": tokens, "one": one}


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict:
    return {
        "tokens": torch.equal(got["tokens"], want["tokens"]) and torch.equal(got["one"], want["one"]),
        "logits": got["logits"].tolist(),
        "want_logits": want["logits"].tolist(),
    }


def local_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this worker holds (a DTensor's local shard)."""
    seen, total = set(), 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if id(param) not in seen:
            seen.add(id(param))
            total += local.numel() * local.element_size()
    return total


results: dict = {}
batch = prompts()
for kind in ("llama", "gpt2"):
    want = run(build(kind).eval(), batch)
    plans = {"ddp": Plan(dp=2), "fsdp": Plan(dp=2, sharding="parameters"), "tp": Plan(dp=1, tp=2), "chosen": None}
    if world == 2 and kind == "llama":
        plans["zero1"] = Plan(dp=2, sharding="optimizer")
    if world == 4:
        plans = {
            "tp-dp": Plan(dp=2, tp=2),
            "hybrid": Plan(dp=4, sharding="hybrid", shard_group=2),
            "pp-tp": Plan(dp=1, pp=2, tp=2, microbatches=1, schedule="gpipe"),
        }
    for name, plan in plans.items():
        model = onegpu.prepare(build(kind), plan=plan).eval()
        results[f"{kind} {name}"] = {**compare(run(model, batch), want), "plan": model.onegpu_plan.describe()}
        if name == "tp-dp":  # each tensor-parallel group serves its own share of single prompts
            rows = [batch["input_ids"][i : i + 1] for i in range(3)]
            with onegpu.split_between_replicas(rows) as mine, torch.no_grad():
                served = [model.generate(r, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0) for r in mine]
            served = [t.tolist() for t in onegpu.gather_object(served)]
            with torch.no_grad():
                alone = [build(kind).eval().generate(r, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
                         for r in rows]  # fmt: skip
            results[f"{kind} {name}"]["served"] = served == [t.tolist() for t in alone]
        if name == "ddp":  # without the cache every call is a plain forward, sliced by rows and gathered
            with torch.no_grad():
                tokens = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                        use_cache=False)  # fmt: skip
            results[f"{kind} {name}"]["tokens"] &= torch.equal(tokens, want["tokens"])
    if world == 2:  # prepared for training under tp=2 with sequence parallelism, then generating
        model = build(kind)
        rows = [{"input_ids": torch.randint(3, 90, (8,))} for _ in range(4)]
        loader = torch.utils.data.DataLoader(rows, batch_size=2)
        model, _, _ = onegpu.prepare(model, torch.optim.AdamW(model.parameters()), loader, plan=Plan(dp=1, tp=2))
        results[f"{kind} trained-tp"] = {
            **compare(run(model.eval(), batch), want),
            "plan": model.onegpu_plan.describe(),
        }
        results[f"{kind} trained-tp"]["sequence_parallel"] = model.onegpu_plan.tensor_parallel.sequence_parallel


class Positions(torch.nn.Module):
    """A hand-written model that adds each position's index: ``cache_position`` indexes positions, not rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 8)

    def forward(self, input_ids, cache_position=None):
        return self.embed(input_ids) + cache_position[None, :, None].float()


if world == 2:  # 3 rows of 3 positions: a cache_position as long as the batch
    ids = torch.randint(0, 50, (3, 3))
    want = Positions()(ids, cache_position=torch.arange(3))
    model = onegpu.prepare(Positions(), plan=Plan(dp=2)).eval()
    with torch.no_grad():
        got = model(ids, cache_position=torch.arange(3))
    results["positions"] = {"equal": torch.equal(got, want)}

    # weights 1.4x what the budget leaves a worker beside the runtime: prepare() without a plan splits them
    big = build("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=1000)
    weights = sum(p.numel() * p.element_size() for p in big.parameters())
    want = run(big.eval(), batch)
    budget_gb = (CPU_RUNTIME_BYTES + weights / 1.4) / 1024**3
    model = onegpu.prepare(build("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 vocab_size=1000), memory_budget_gb=budget_gb).eval()  # fmt: skip
    results["too big"] = {
        **compare(run(model, batch), want),
        "plan": model.onegpu_plan.describe(),
        "local_share": local_bytes(model) / weights,
    }

    # the same without tensor-parallel structure (3 heads, 511 features): prepare() cuts a pipeline
    sizes = dict(hidden_size=240, intermediate_size=511, num_hidden_layers=4, num_attention_heads=3,
                 num_key_value_heads=3, vocab_size=100)  # fmt: skip
    big = build("llama", **sizes).eval()
    weights = sum(p.numel() * p.element_size() for p in big.parameters())
    want = run(big, batch)
    budget_gb = (CPU_RUNTIME_BYTES + weights / 1.4) / 1024**3
    model = onegpu.prepare(build("llama", **sizes), memory_budget_gb=budget_gb).eval()
    results["too big, no tp"] = {
        **compare(run(model, batch), want),
        "plan": model.onegpu_plan.describe(),
        "local_share": local_bytes(model) / weights,
    }

if onegpu.is_main_process():
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results))
