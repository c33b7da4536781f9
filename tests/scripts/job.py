"""A small single-device training script whose behaviour the tests pick: job.py MODE [TAG]."""

import os
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import onegpu

onegpu.init()
mode = sys.argv[1]
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data = TensorDataset(torch.randn(12, 4), torch.randn(12, 1))
loader = DataLoader(data, batch_size=2 if mode == "tiny-batch" else 6)
model, optimizer, loader = onegpu.prepare(model, optimizer, loader)
rank = int(os.environ.get("RANK", "0"))
for step, (x, y) in enumerate(loader):
    if step == 1 and rank == 1 and mode == "crash":
        raise RuntimeError("boom on rank 1")
    if step == 1 and rank == 1 and mode == "hang":
        time.sleep(600)  # a peer that stops taking part: rank 0 waits in its next collective
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(f"hello from rank {rank} of {os.environ.get('WORLD_SIZE', '1')}")
