"""Worker script: TinyLM returning its loss in every shape (tests/shapes.py) under every plan of this worker
count, plus the loss counted in items, outputs a loss is computed from, and metrics through onegpu.gather;
rank 0 writes results.json and a checkpoint per run.

2 workers: DDP, FSDP, pp2 (1F1B, 4 micro-batches of a batch of 8), tp2. 3: DDP and
FSDP (slices of 3, 2 and 2). 4: pp2 x dp2 (replicas of 4 and 3 rows, one micro-batch each).
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapes import SHAPES, accuracy, train, train_on_features  # noqa: E402

import onegpu  # noqa: E402
from onegpu.plan import Plan  # noqa: E402

out = Path(sys.argv[1])
world = int(os.environ.get("WORLD_SIZE", "1"))
PLANS = {
    2: {
        "ddp": {"strategy": "ddp"},
        "fsdp": {"strategy": "fsdp"},
        "pp2": {"plan": Plan(dp=1, pp=2, microbatches=4, schedule="1f1b"), "batch": 8},
        "tp2": {"plan": Plan(dp=1, tp=2)},
    },
    3: {"ddp": {"strategy": "ddp"}, "fsdp": {"strategy": "fsdp"}},
    4: {"pp2-dp2": {"plan": Plan(dp=2, pp=2, microbatches=1, schedule="gpipe")}},
}[world]
# a token mean over targets of which a varying number are ignored (-1): counted in items, or not
ITEMS = {
    2: {"pp2": {"plan": Plan(dp=1, pp=2, microbatches=4, schedule="1f1b"), "batch": 8}},
    3: {"ddp": {"strategy": "ddp"}, "fsdp": {"strategy": "fsdp"}},
    4: {"pp2-dp2": {"plan": Plan(dp=2, pp=2, microbatches=2, schedule="gpipe"), "batch": 8}},
}.get(world, {})
results = {}


def count_items(idx, targets=None):
    return (targets != -1).sum()


def record(name: str, shape: str, **how) -> None:
    run = train(shape, prepare=onegpu.prepare, **how)
    onegpu.save_pretrained(run.pop("model"), out / name)
    results[name] = run


for plan_name, how in PLANS.items():
    for shape in SHAPES:
        record(f"{shape}-{plan_name}", shape, **how)
for plan_name, how in ITEMS.items():
    record(f"items-{plan_name}", "tuple_loss_last", ignored=True, count_items=count_items, **how)
    record(f"samples-{plan_name}", "tuple_loss_last", ignored=True, **how)


if world == 3:
    onegpu.save_pretrained(train_on_features(prepare=onegpu.prepare, strategy="ddp"), out / "features-ddp")
    results["accuracy-ddp"] = accuracy(prepare=onegpu.prepare, gather=onegpu.gather, strategy="ddp")
    results["accuracy-fsdp"] = accuracy(prepare=onegpu.prepare, gather=onegpu.gather, strategy="fsdp")
    results["gathered_ranks"] = onegpu.gather(torch.tensor(torch.distributed.get_rank())).tolist()
if world == 2:
    results["accuracy-tp2"] = accuracy(prepare=onegpu.prepare, gather=onegpu.gather, plan=Plan(dp=1, tp=2))
if world == 4:  # evaluation under a pipeline returns the logits, on every worker of the replica
    pipeline = Plan(dp=2, pp=2, microbatches=1, schedule="gpipe")
    results["accuracy-pp2-dp2"] = accuracy(prepare=onegpu.prepare, gather=onegpu.gather, plan=pipeline)
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps(results))
