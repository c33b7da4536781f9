"""Worker script: a 252 MB Llama built on the meta device, on a 2-stage pipeline; each worker must
allocate only its own stage. Rank 0 writes what every worker held and how its memory grew."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import meta_llama, write_gathered  # noqa: E402

import onegpu  # noqa: E402
from onegpu.machine import resident_bytes  # noqa: E402
from onegpu.plan import Plan  # noqa: E402

model = meta_llama(
    hidden_size=512, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=4
)
whole = sum(p.numel() * p.element_size() for p in model.parameters())
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = onegpu.prepare(model, optimizer, plan=Plan(dp=1, pp=2, microbatches=2, schedule="gpipe"))
ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
before = resident_bytes()
with torch.no_grad():  # builds and materializes this worker's stage; forward only
    model(input_ids=ids, labels=ids)
grown = resident_bytes() - before
held = sum(p.numel() * p.element_size() for p in model.parameters())
losses = []
for _ in range(3):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
report = {
    "whole": whole,
    "held": held,
    "grown": grown,
    "on_meta": sum(p.is_meta for p in model.parameters()),
    "optimized": sum(p.numel() for group in optimizer.param_groups for p in group["params"]) * 4,
    "losses": losses,
}
write_gathered(report, sys.argv[1])
