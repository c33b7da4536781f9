"""A Llama built on the meta device, with a budget DDP cannot meet: onegpu must shard, never materialize it whole."""

import json
import resource
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import onegpu

config = LlamaConfig(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
with torch.device("meta"):
    model = LlamaForCausalLM(config)
total = sum(p.numel() for p in model.parameters())
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
# DDP would need params + grads + 2 Adam states = 16 bytes per parameter on every worker
budget_gb = 10 * total / 1024**3
model, optimizer = onegpu.prepare(model, optimizer, memory_budget_gb=budget_gb)
local = sum(p.to_local().numel() for p in model.parameters())
ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
losses = []
for _ in range(3):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
report = {
    "strategy": model.onegpu_plan.strategy,
    "total": total,
    "local": local,
    "losses": losses,
    "rope_ok": bool(torch.isfinite(model.model.rotary_emb.inv_freq).all()),
    "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}
gathered = [None] * torch.distributed.get_world_size()
torch.distributed.all_gather_object(gathered, report)
if onegpu.is_main_process():
    with open(sys.argv[1], "w") as handle:
        json.dump(gathered, handle)
