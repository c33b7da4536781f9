"""Worker script: every scenario x strategy through onegpu; rank 0 writes results.json + checkpoints."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from scenarios import train  # noqa: E402

import onegpu  # noqa: E402
from onegpu.plan import Plan  # noqa: E402

out = Path(sys.argv[1])
world = int(os.environ.get("WORLD_SIZE", "1"))
# the memory techniques, run where they matter: on 2 workers
MEMORY_PLANS = {
    "fsdp-checkpoint-offload": Plan(dp=2, sharding="parameters", activation_checkpointing="full", offload="parameters"),
    "zero2-checkpoint-1": Plan(dp=2, sharding="gradients", activation_checkpointing=1),
    "ddp-checkpoint-full": Plan(dp=2, sharding="none", activation_checkpointing="full"),
    "fsdp-selective": Plan(dp=2, sharding="parameters", activation_checkpointing="selective"),
}
results = {}
for scenario in ("hf", "gpt2", "custom", "external"):
    hows = {"ddp": {"strategy": "ddp"}, "fsdp": {"strategy": "fsdp"}}
    if world == 2:
        hows.update({name: {"plan": plan} for name, plan in MEMORY_PLANS.items()})
    if world == 3 and scenario == "external":  # the loss given to prepare, on slices of 2, 2 and 1
        hows["ddp-loss_fn"] = {"strategy": "ddp", "loss_fn": torch.nn.functional.mse_loss}
    for strategy, how in hows.items():
        run = train(scenario, prepare=onegpu.prepare, **how)
        run.pop("loader")
        onegpu.save_pretrained(run.pop("model"), out / f"{scenario}-{strategy}")
        if dist.is_initialized():  # what every worker saw, to show the batch really was split
            sizes = [None] * dist.get_world_size()
            dist.all_gather_object(sizes, run["local_batch_sizes"])
            run["local_batch_sizes"] = sizes
        else:
            run["local_batch_sizes"] = [run["local_batch_sizes"]]
        results[f"{scenario}-{strategy}"] = run
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps(results))
