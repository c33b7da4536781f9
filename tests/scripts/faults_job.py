"""A training job whose fault the tests pick: faults_job.py MODE OUT TAG [--strategy ddp|fsdp] [--steps N].

Every worker writes OUT/rank-N.pid (its pid and the time of its first step) once it has trained a step,
so a test can wait for the job to be mid-training and then act on it. Modes:

  train               train for --steps steps (a job to kill from outside)
  exit0               rank 1 leaves with sys.exit(0) at step 3 while the others train on
  save-on-main        the Hugging Face idiom `if is_main_process(): save_pretrained(...)` after training
  save-on-main-train  the same idiom in the middle of training: the others train on
  save-bad-path       every worker saves under OUT/a-file, a regular file (rank 0 cannot write there)
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import onegpu

parser = argparse.ArgumentParser()
parser.add_argument("mode")
parser.add_argument("out", type=Path)
parser.add_argument("tag")
parser.add_argument("--strategy", default="ddp")
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

rank = int(os.environ.get("RANK", "0"))
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
data = TensorDataset(torch.randn(8, 8), torch.randn(8, 1))
loader = DataLoader(data, batch_size=4)
model, optimizer, loader = onegpu.prepare(model, optimizer, loader, strategy=args.strategy)


def train_step(x, y) -> None:
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


batches = list(loader)
for step in range(args.steps):
    x, y = batches[step % len(batches)]
    if args.mode == "exit0" and rank == 1 and step == 3:
        sys.exit(0)
    if args.mode == "save-on-main-train" and step == 3 and onegpu.is_main_process():
        onegpu.save_pretrained(model, args.out / "checkpoint")
    train_step(x, y)
    if step == 0:
        (args.out / f"rank-{rank}.pid").write_text(json.dumps({"pid": os.getpid(), "started": time.time()}))
    time.sleep(0.1)  # a job that lasts: the tests act on it while it trains
if args.mode == "save-on-main" and onegpu.is_main_process():
    onegpu.save_pretrained(model, args.out / "checkpoint")
if args.mode == "save-bad-path":
    (args.out / "a-file").write_text("not a directory")
    onegpu.save_pretrained(model, args.out / "a-file" / "checkpoint")
print(f"done on rank {rank}")
