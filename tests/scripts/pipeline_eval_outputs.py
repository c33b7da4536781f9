"""Worker script: evaluation under a pipeline returns the model's whole output on every worker.

Llama and GPT-2 (from config) are evaluated, with and without labels, on a batch of 6 rows. 2 workers:
pp=2 with the GPipe and the 1F1B schedule (3 micro-batches); 4 workers: pp=2 x dp=2 (replicas of 3
rows, micro-batches of 1), where the models then also generate (:func:`scenarios.greedy_generation`).
Every worker reports what its loop saw: the output's type, its loss, its rows' input ids and logits, and
an accuracy computed from them (and what it generated); rank 0 writes them all to results.json.
"""

import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import GENERATED, build, greedy_generation, write_gathered  # noqa: E402

import onegpu  # noqa: E402
from onegpu.plan import Plan  # noqa: E402

ROWS = 6

out = Path(sys.argv[1])
if int(os.environ.get("WORLD_SIZE", "1")) == 2:
    plans = {
        "pp2-gpipe": Plan(dp=1, pp=2, microbatches=3, schedule="gpipe"),
        "pp2-1f1b": Plan(dp=1, pp=2, microbatches=3, schedule="1f1b"),
    }
else:
    plans = {"pp2-dp2": Plan(dp=2, pp=2, microbatches=3, schedule="1f1b")}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Next-token predictions that are right, and the tokens counted (labels not -100)."""
    predicted, wanted = logits[:, :-1].argmax(-1), labels[:, 1:]
    counted = wanted != -100
    return int(((predicted == wanted) & counted).sum()), int(counted.sum())


report = {"rank": int(os.environ["RANK"])}
generation = {}
for scenario in ("hf", "gpt2"):
    for name, plan in plans.items():
        model, data = build(scenario)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer, loader = onegpu.prepare(model, optimizer, DataLoader(data, batch_size=ROWS), plan=plan)
        model.eval()
        batch = next(iter(loader))
        with torch.no_grad():
            output = model(**batch)
            inference = model(input_ids=batch["input_ids"])  # no labels: no loss, the logits all the same
        report[f"{scenario}-{name}"] = {
            "type": type(output).__name__,
            "loss": float(output.loss),
            "input_ids": batch["input_ids"].tolist(),
            "logits": output.logits.tolist(),
            "accuracy": accuracy(output.logits, batch["labels"]),
            "inference_loss": inference.loss,
            "inference_logits": inference.logits.tolist(),
        }
        if name == "pp2-dp2":  # then generation, and a forward of 3 rows (replicas of 2 and 1: not 3 micro-batches)
            seen = greedy_generation(model, vocab=64)
            generation[f"{scenario}-{name}"] = {key: seen[key].tolist() for key in GENERATED}
if generation:
    report["generation"] = generation
write_gathered(report, str(out / "results.json"))
