"""A training job that meets a fault of files: faults_files.py MODE ARG [TAG].

``save-to PATH``: train a step, then save the model to PATH (a file, in the tests: refused at once).
``delete-ledger -``: train a step, then rank 0 deletes the pool's ledger while the job holds its devices;
the job trains on and finishes.
"""

import os
import sys
from pathlib import Path

import torch

import onegpu

onegpu.init()
mode, argument = sys.argv[1], sys.argv[2]
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = onegpu.prepare(model, optimizer)
rank = int(os.environ.get("RANK", "0"))


def train_step() -> None:
    loss = model(torch.randn(6, 4)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


train_step()
if mode == "save-to":
    onegpu.save_pretrained(model, argument)
elif mode == "delete-ledger" and rank == 0:
    for path in Path(os.environ["ONEGPU_HOME"]).glob("ledger.sqlite*"):
        path.unlink()
train_step()
print(f"rank {rank} finished")
