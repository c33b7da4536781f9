"""Worker script: the scenarios on a 2-stage pipeline (GPipe and 1F1B); rank 0 writes results.json + checkpoints."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import build, train  # noqa: E402

import onegpu  # noqa: E402
from onegpu.errors import UsageError  # noqa: E402
from onegpu.planner.plan import Plan  # noqa: E402

out = Path(sys.argv[1])
results = {}
for scenario in ("hf", "gpt2", "custom"):
    for schedule in ("gpipe", "1f1b"):
        run = train(
            scenario,
            prepare=onegpu.prepare,
            plan=Plan(dp=1, pp=2, microbatches=5, schedule=schedule),
            clip=False,
            evaluate=False,
        )
        onegpu.save_pretrained(run.pop("model"), out / f"{scenario}-{schedule}")
        results[f"{scenario}-{schedule}"] = run

# a loss changed after the forward cannot be honoured by a pipeline: it is reported, not silently wrong
model, data = build("custom")
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = torch.utils.data.DataLoader(data, batch_size=4)
model, optimizer, loader = onegpu.prepare(
    model, optimizer, loader, plan=Plan(dp=1, pp=2, microbatches=2, schedule="gpipe")
)
x, y = next(iter(loader))
try:
    (model(x, y).loss * 2).backward()
    results["changed_loss"] = "not detected"
except UsageError as error:
    results["changed_loss"] = str(error)
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps(results))
