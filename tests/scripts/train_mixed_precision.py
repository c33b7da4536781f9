"""Worker script: bf16 plans of every layout; rank 0 writes results.json + checkpoints.

1 worker: bf16 alone, and fp16 refused on a CPU. 2 workers: replicated, ZeRO-2 and ZeRO-3 (slices of 3 and 2 rows), a 1F1B pipeline (5 micro-batches of one
row) and tensor parallelism (Llama only: the hand-written model has no tensor-parallel structure), on a
Llama and a hand-written model. 4 workers: the 2D layouts tp2 x dp2, pp2 x dp2 (ZeRO-3 stages) and tp2 x pp2,
on the Llama. Also a loop
that runs its forward under torch.autocast, and the AP pin ``mixed_precision="bf16"``.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import train  # noqa: E402

import onegpu  # noqa: E402
from onegpu.errors import UsageError  # noqa: E402
from onegpu.plan import Plan  # noqa: E402
from onegpu.runtime.loss_scale import DynamicLossScale  # noqa: E402

out = Path(sys.argv[1])
world = int(os.environ.get("WORLD_SIZE", "1"))
BF16 = {"precision": "bf16"}
if world == 1:
    plans = {"single": Plan(dp=1, **BF16)}
elif world == 2:
    plans = {
        "ddp": Plan(dp=2, **BF16),
        "zero2": Plan(dp=2, sharding="gradients", **BF16),
        "fsdp": Plan(dp=2, sharding="parameters", **BF16),
        "pp2": Plan(dp=1, pp=2, microbatches=5, schedule="1f1b", **BF16),
        "tp2": Plan(dp=1, tp=2, **BF16),
    }
else:
    plans = {
        "tp2-dp2": Plan(dp=2, tp=2, **BF16),
        "pp2-dp2": Plan(dp=2, pp=2, microbatches=1, schedule="gpipe", sharding="parameters", **BF16),
        "tp2-pp2": Plan(dp=1, tp=2, pp=2, microbatches=5, schedule="1f1b", **BF16),
    }
results = {}
for scenario in ("hf", "custom") if world < 4 else ("hf",):
    for name, plan in plans.items():
        if plan.tp > 1 and scenario == "custom":
            continue
        run = train(scenario, prepare=onegpu.prepare, plan=plan)
        model = run.pop("model")
        run.pop("loader")
        run["dtypes"] = sorted({str(p.dtype) for p in model.parameters()})  # the master weights, outside a step
        onegpu.save_pretrained(model, out / f"{scenario}-{name}")
        results[f"{scenario}-{name}"] = run
if world == 1:
    try:
        train("hf", prepare=onegpu.prepare, plan=Plan(dp=1, precision="fp16"))
    except UsageError as error:
        results["fp16"] = str(error)
if world == 2:  # a loop that already uses autocast, under a bf16 plan; the AP pin reaching prepare
    autocast = torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    run = train("hf", prepare=onegpu.prepare, plan=Plan(dp=2, **BF16), autocast=autocast)
    results["hf-ddp-autocast"] = {k: run[k] for k in ("losses", "grad_norms", "eval_loss")}
    # fp16's loss scale, on bf16 here (a CPU runs no fp16): a power of two in and out changes nothing ...
    for name, initial, plan in (
        ("ddp-scaled", 2.0**16, Plan(dp=2, **BF16)),
        ("ddp-overflow", 2.0**130, Plan(dp=2, **BF16)),
        ("pp2-scaled", 2.0**16, plans["pp2"]),
    ):
        scalers = []

        def prepare_scaled(*objects, initial=initial, scalers=scalers, **how):
            model, optimizer, loader = onegpu.prepare(*objects, **how)
            scalers.append(DynamicLossScale(model, (optimizer,), initial=initial, growth_interval=3))
            return model, optimizer, loader

        run = train("hf", prepare=prepare_scaled, plan=plan, evaluate=False)
        results[f"hf-{name}"] = {"losses": run["losses"], "grad_norms": run["grad_norms"]}
        results[f"hf-{name}"].update(skipped=scalers[0].skipped, scale=scalers[0].scale)
    onegpu.enable_advanced_parallelization(mixed_precision="bf16", dp=2)
    model = train("hf", prepare=onegpu.prepare, evaluate=False, batch=4)["model"]
    results["pinned"] = model.onegpu_plan.precision
    onegpu.disable_advanced_parallelization()
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps(results))
