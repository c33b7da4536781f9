"""Worker script: a few steps of a tiny token model that clips its gradients; rank 0 writes the losses and norms
it saw to OUT/results.json, then the job waits to be stopped (metrics_job.py OUT)."""

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_  # by name, before onegpu is imported
from torch.utils.data import DataLoader, TensorDataset

import onegpu

STEPS, BATCH, SEQ, VOCAB = 4, 4, 8, 32


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(torch.tanh(self.embed(idx)))
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


out = Path(sys.argv[1])
torch.manual_seed(0)
tokens = torch.randint(0, VOCAB, (STEPS * BATCH, SEQ + 1))
loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=BATCH)
model = TinyLM()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer, loader = onegpu.prepare(model, optimizer, loader)
losses, norms = [], []
for idx, targets in loader:
    _, loss = model(idx, targets)
    loss.backward()
    norms.append(float(clip_grad_norm_(model.parameters(), 1.0)))
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps({"losses": losses, "grad_norms": norms}))
time.sleep(600)  # until the test stops the job
