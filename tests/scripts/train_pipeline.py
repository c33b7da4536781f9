"""Worker script: the scenarios on a 2-stage pipeline; rank 0 writes results.json + checkpoints.

2 workers: one pipeline, 5 micro-batches of 1 sample: GPipe, 1F1B, and 1F1B with every block
checkpointed; interleaved 1F1B and interleaved zero-bubble (2 stages per worker) on 4-block models. 4 workers: two replicas of it (slices of 3 and 2 samples, one micro-batch each) on
one 2D mesh, data-parallel (GPipe) or sharded with FSDP (GPipe, checkpointing, offload). A model
without its own loss trains with one given to prepare (1F1B on 2 workers, pp2 x dp2 on 4).
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import build, train  # noqa: E402

import onegpu  # noqa: E402
from onegpu.errors import UsageError  # noqa: E402
from onegpu.plan import Plan  # noqa: E402

out = Path(sys.argv[1])
world = int(os.environ.get("WORLD_SIZE", "1"))
if world == 4:
    plans = {
        "dp2-gpipe": Plan(dp=2, pp=2, microbatches=1, schedule="gpipe"),
        "fsdp2-gpipe": Plan(
            dp=2,
            pp=2,
            microbatches=1,
            schedule="gpipe",
            sharding="parameters",
            activation_checkpointing="full",
            offload="parameters",
        ),
    }
else:
    plans = {schedule: Plan(dp=1, pp=2, microbatches=5, schedule=schedule) for schedule in ("gpipe", "1f1b")}
    plans["1f1b-checkpointed"] = Plan(dp=1, pp=2, microbatches=5, schedule="1f1b", activation_checkpointing="full")
    for schedule in ("interleaved", "zero-bubble"):
        plans[schedule] = Plan(dp=1, pp=2, microbatches=4, schedule=schedule)
# interleaving runs 2 stages per worker: deeper models (4 stages), a batch of 4 micro-batches
OPTIONS = {"interleaved": {"layers": 4, "batch": 4}, "zero-bubble": {"layers": 4, "batch": 4}}
results = {}


def record(scenario: str, name: str, **how) -> None:
    """Train ``scenario`` under ``how``; keep its results, the share of the model this worker holds (its
    stage's parameters; its shard of them under FSDP) and its checkpoint."""
    run = train(scenario, prepare=onegpu.prepare, **how)
    run["is_the_users_class"] = isinstance(run["model"], type(build(scenario, layers=how.get("layers", 2))[0]))
    run["clip_unpatched"] = torch.nn.utils.clip_grad._get_total_norm.__module__ == "torch.nn.utils.clip_grad"
    held = sum(getattr(p, "_local_tensor", p).numel() for p in run["model"].parameters())
    whole = build(scenario, layers=how.get("layers", 2))[0]
    run["held"] = held / sum(p.numel() for p in whole.parameters())
    run.pop("loader")
    onegpu.save_pretrained(run.pop("model"), out / f"{scenario}-{name}")
    results[f"{scenario}-{name}"] = run


for scenario in ("hf", "gpt2", "custom", "tower"):
    for name, plan in plans.items():
        if scenario == "tower" and name not in ("gpipe", "1f1b", "dp2-gpipe", "fsdp2-gpipe"):  # traced-graph stages
            continue
        record(scenario, name, plan=plan, **OPTIONS.get(name, {}))

# a model without its own loss, given one through prepare(loss_fn=...)
name = "dp2-gpipe" if world == 4 else "1f1b"
record("external", name, plan=plans[name], loss_fn=torch.nn.functional.mse_loss)

# a loss changed after the forward cannot be honoured by a pipeline: it is reported, not silently wrong
model, data = build("custom")
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = torch.utils.data.DataLoader(data, batch_size=4)
plan = Plan(dp=world // 2, pp=2, microbatches=1, schedule="gpipe")
model, optimizer, loader = onegpu.prepare(model, optimizer, loader, plan=plan)
x, y = next(iter(loader))
try:
    (model(x, y) + sum(p.sum() for p in model.parameters())).backward()  # a term added
    results["changed_loss"] = "not detected"
except UsageError as error:
    results["changed_loss"] = str(error)
# with a loss given to prepare, a pipeline needs the target to compute it
model, data = build("external")
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = torch.utils.data.DataLoader(data, batch_size=4)
model, optimizer, loader = onegpu.prepare(model, optimizer, loader, plan=plan, loss_fn=torch.nn.functional.mse_loss)
try:
    model(next(iter(loader))[0])
    results["no_target"] = "accepted"
except UsageError as error:
    results["no_target"] = str(error)
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps(results))
