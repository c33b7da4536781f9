"""A job another launcher started (torchrun, or srun emulated by the test), not onegpu: external_job.py OUT MODE.

MODE ``init`` calls onegpu.init() and trains on a DataLoader; ``prepare`` calls only onegpu.prepare and builds its
own batches. While it runs, rank 0 records what ``onegpu smi --json`` shows in OUT/rank0.json.
"""

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import onegpu
from onegpu.cli.smi import smi

out, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "init":
    onegpu.init()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
if mode == "init":
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16, 1)), batch_size=8)
    model, optimizer, loader = onegpu.prepare(model, optimizer, loader)
else:
    model, optimizer = onegpu.prepare(model, optimizer)
    loader = [(torch.randn(6, 4), torch.randn(6, 1)) for _ in range(2)]
for x, y in loader:
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
if onegpu.is_main_process():
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        smi(as_json=True)
    seen = {"pid": os.getpid(), "run_id": os.environ.get("TORCHELASTIC_RUN_ID"), "smi": json.loads(shown.getvalue())}
    (out / "rank0.json").write_text(json.dumps(seen))
