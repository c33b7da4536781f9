"""A Llama built on the meta device, with a budget DDP cannot meet: onegpu must shard, never materialize it whole."""

import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import meta_llama, write_gathered  # noqa: E402

import onegpu  # noqa: E402

model = meta_llama(hidden_size=128, intermediate_size=256, num_hidden_layers=4)
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
write_gathered(report, sys.argv[1])
