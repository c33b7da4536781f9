"""Worker script: prompts split across replicas, completed in batches (greedy, KV cache, left padding), gathered
in order; rank 0 writes results.json with what one plain process completes for the same prompts.

Each case records the worker's share, the model calls it made and the collectives it took part in inside the
split: a replica's own calls talk to no other replica.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from completions import complete_ids  # noqa: E402
from demo_data import load_tokenizer  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import onegpu  # noqa: E402
from onegpu.plan import Plan  # noqa: E402

PROMPTS = ["In the beginning", "And God said, Let", "Jesus wept.", "Blessed are the meek", "Love", "Thou shalt", "Amen"]
tokenizer = load_tokenizer()
collectives = [0]


def counted(collective):
    def call(*args, **kwargs):
        collectives[0] += 1
        return collective(*args, **kwargs)

    return call


for name in ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor"):
    setattr(dist, name, counted(getattr(dist, name)))


def build(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":  # fused qkv, tied embeddings, an odd vocabulary
        return GPT2LMHeadModel(GPT2Config(vocab_size=389, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def serve(kind: str, plan: Plan, prompts: list[str], *, batch_size: int = 2) -> dict:
    want = complete_ids(build(kind), tokenizer, prompts, batch_size=batch_size, max_new_tokens=6)
    model = onegpu.prepare(build(kind), plan=plan)
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    collectives[0] = 0
    with onegpu.split_between_replicas(prompts) as mine:
        ids = complete_ids(model, tokenizer, mine, batch_size=batch_size, max_new_tokens=6)
    inside = collectives[0]
    got = onegpu.gather_object(ids)
    mine_everywhere = onegpu.gather_object({"share": mine, "calls": calls[0], "collectives": inside})
    return {"prompts": prompts, "got": got, "want": want, "replicas": mine_everywhere}


cases = {
    "llama dp2, 7 prompts": serve("llama", Plan(dp=2), PROMPTS),
    "gpt2 dp2, 7 prompts": serve("gpt2", Plan(dp=2), PROMPTS),
    "llama dp2, 1 prompt": serve("llama", Plan(dp=2), PROMPTS[:1]),
    "llama dp2, no prompt": serve("llama", Plan(dp=2), []),
    "llama zero1, 1 prompt": serve("llama", Plan(dp=2, sharding="optimizer"), PROMPTS[:1]),
    "llama fsdp, 7 prompts": serve("llama", Plan(dp=2, sharding="parameters"), PROMPTS),
}
if onegpu.is_main_process():
    (Path(sys.argv[1]) / "results.json").write_text(json.dumps(cases))
