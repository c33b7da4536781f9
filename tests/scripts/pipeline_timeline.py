"""Worker script: pipelines that record their measured timeline; each worker keeps a copy of its record.

2 workers. A balanced stack of identical blocks (its own loss, no embedding or head) on 1F1B with 4
micro-batches; then the same stack interleaved (4 stages), and a model without repeated blocks cut from its
traced graph (GPipe). Every loop times each call; rank 0 writes results.json. The record of each pipeline
replaces the previous one's in the job's directory, so each worker copies its own file to ``<out>/<name>/``.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import Tower  # noqa: E402

import onegpu  # noqa: E402
from onegpu.plan import Plan  # noqa: E402
from onegpu.settings import settings  # noqa: E402

out = Path(sys.argv[1])
DIM, ROWS = 768, 256  # tens of ms per stage and micro-batch on one CPU thread: far more than a message costs


class Layer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class Stack(nn.Module):
    """Identical blocks and nothing else: every stage computes the same (the loss is a mean)."""

    def __init__(self, layers: int, dim: int = DIM) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(dim) for _ in range(layers))

    def forward(self, x, y):
        for layer in self.layers:
            x = layer(x)
        return nn.functional.mse_loss(x, y)


def run(name: str, model: nn.Module, plan: Plan, *, calls: int, width: int) -> None:
    torch.manual_seed(0)
    batch = ROWS * plan.microbatches
    x, y = torch.randn(batch, width), torch.randn(batch, 1 if isinstance(model, Tower) else width)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model, optimizer = onegpu.prepare(model, optimizer, plan=plan)
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
    mine = settings().status_dir / "timeline" / f"rank-{dist.get_rank()}.json"
    (out / name / "timeline").mkdir(parents=True, exist_ok=True)
    shutil.copy(mine, out / name / "timeline" / mine.name)
    results[name] = {"seconds": seconds}


results = {}
run("1f1b", Stack(4), Plan(dp=1, pp=2, microbatches=4, schedule="1f1b"), calls=4, width=DIM)
run(
    "interleaved", Stack(4, DIM // 4), Plan(dp=1, pp=2, microbatches=4, schedule="interleaved"), calls=4, width=DIM // 4
)
run("tower", Tower(), Plan(dp=1, pp=2, microbatches=4, schedule="gpipe"), calls=4, width=8)
dist.barrier()
if dist.get_rank() == 0:
    (out / "results.json").write_text(json.dumps(results))
