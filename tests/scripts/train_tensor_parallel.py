"""Worker script: the scenarios under tensor parallelism; rank 0 writes results.json + checkpoints.

2 workers: tp=2 on Llama (grouped-query attention), Qwen2 (q/k/v biases), GPT-2 (fused qkv, tied
embeddings) and BERT (an encoder), and Llama and GPT-2 with a vocabulary of 257 that 2 does not
divide; Llama with selective recomputation; the hand-written model, which has no tensor-parallel structure,
must be refused with the reason. 4 workers: tp=2 x dp=2 (replicas read slices of 3 and 2), and tp=2 x pp=2 (1F1B, 5
micro-batches), GPT-2 with both vocabularies. 8 workers: tp=2 x pp=2 x dp=2 on Llama.
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
if world == 2:
    plans = {"tp2": Plan(dp=1, tp=2)}
elif world == 4:
    plans = {"tp2-dp2": Plan(dp=2, tp=2), "tp2-pp2": Plan(dp=1, tp=2, pp=2, microbatches=5, schedule="1f1b")}
else:  # all three on one mesh: replicas of 3 and 2 rows, each a 2-stage pipeline split over 2 workers
    plans = {"tp2-pp2-dp2": Plan(dp=2, tp=2, pp=2, microbatches=1, schedule="gpipe")}
scenarios = {2: ("hf", "qwen2", "gpt2", "bert", "hf-odd", "gpt2-odd"), 4: ("hf", "gpt2", "gpt2-odd")}
scenarios = scenarios.get(world, ("hf",))
results = {}
for scenario in scenarios:
    runs = dict(plans)
    if world == 2 and scenario == "hf":  # selective recomputation keeps the tensor-parallel reductions' outputs
        runs["tp2-selective"] = Plan(dp=1, tp=2, activation_checkpointing="selective")
    for name, plan in runs.items():
        run = train(scenario, prepare=onegpu.prepare, plan=plan)
        model, loader = run.pop("model"), run.pop("loader")
        # the share of the model's parameters this worker holds
        held = sum(getattr(p, "_local_tensor", p).numel() for p in model.parameters())
        run["held"] = held / sum(p.numel() for p in build(scenario)[0].parameters())
        layout = model.onegpu_plan.tensor_parallel
        if plan.pp == 1:  # how many positions a norm inside a block sees: all, or this worker's share
            run["sequence_parallel"] = layout.sequence_parallel
            norm = model.get_submodule(f"{model.onegpu_plan.blocks}.0.{(layout.norms or ('',))[0]}".rstrip("."))
            seen = []
            handle = norm.register_forward_pre_hook(
                lambda module, args, seen=seen: seen.append(args[0].shape[1]),
                prepend=True,  # as it arrives
            )
            with torch.no_grad():
                model(**next(iter(loader)))
            handle.remove()
            run["norm_positions"] = seen[0]
        if scenario.endswith("-odd"):  # the logits the loop sees: the model's own vocabulary, not the padded one
            with torch.no_grad():
                run["logits_vocabulary"] = model(**next(iter(loader))).logits.shape[-1]
        onegpu.save_pretrained(model, out / f"{scenario}-{name}")
        results[f"{scenario}-{name}"] = run
try:
    if world < 8:
        train("custom", prepare=onegpu.prepare, plan=Plan(dp=world // 2, tp=2))
        results["no_structure"] = "accepted"
except UsageError as error:
    results["no_structure"] = str(error)
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps(results))
