"""Worker script: ZeRO-1, optimizer-only offload and hybrid sharding; rank 0 writes results.json + checkpoints.

2 workers: ZeRO-1 and offload of the optimizer under every sharding (AdamW, Adam), a resumed ZeRO-1 run, the
optimizer state each worker holds. 4 workers: hybrid sharding (shard groups of 2) with the optimizer offloaded.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resume import resumed_losses  # noqa: E402
from scenarios import SkipNet, train  # noqa: E402

import onegpu  # noqa: E402
from onegpu.errors import UsageError  # noqa: E402
from onegpu.plan import Plan  # noqa: E402

out = Path(sys.argv[1])
world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
ADAM = {"optimizer_class": torch.optim.Adam}
if world == 2:
    RUNS = {  # offload of the optimizer under each sharding; ZeRO-1's pieces on the device and on the host
        "custom-zero1-offload_parameters": ("custom", Plan(dp=2, sharding="optimizer", offload="parameters"), {}),
        "hf-zero1-offload": ("hf", Plan(dp=2, sharding="optimizer", offload="optimizer"), ADAM),
        "tower-ddp-offload": ("tower", Plan(dp=2, offload="optimizer"), ADAM),
        "custom-fsdp-offload": ("custom", Plan(dp=2, sharding="parameters", offload="optimizer"), {}),
    }
else:  # 4 workers: two groups of 2 that shard, replicating each other
    RUNS = {"custom-hybrid-offload": ("custom", Plan(dp=4, sharding="hybrid", shard_group=2, offload="optimizer"), {})}


def state_bytes(optimizer) -> int:
    """Bytes of the optimizer state this worker holds (its step counters aside)."""
    return sum(
        getattr(v, "_local_tensor", v).nbytes for s in optimizer.state.values() for k, v in s.items() if k != "step"
    )


def storages(tensors) -> set[int]:
    return {getattr(t, "_local_tensor", t).untyped_storage().data_ptr() for t in tensors}


results = {}
import time  # noqa: E402

for name, (scenario, plan, options) in RUNS.items():
    started = time.time()
    kept = {}

    def prepare(model, optimizer, loader, kept=kept, **how):
        kept["whole"] = sum(p.numel() for p in model.parameters())
        kept["optimizer"] = optimizer
        return onegpu.prepare(model, optimizer, loader, **how)

    run = train(scenario, prepare=prepare, plan=plan, **options)
    model, optimizer = run.pop("model"), kept["optimizer"]
    run.pop("loader")
    run["state_bytes"] = state_bytes(optimizer)
    run["whole_params"] = kept["whole"]
    run["held_params"] = sum(getattr(p, "_local_tensor", p).numel() for p in model.parameters())
    run["state_apart"] = not storages(p for g in optimizer.param_groups for p in g["params"]) & storages(
        model.parameters()
    )
    run["placements"] = sorted({str(getattr(p, "placements", "")) for p in model.parameters()})
    onegpu.save_pretrained(model, out / name)
    gathered = [None] * world
    dist.all_gather_object(gathered, {k: run[k] for k in ("state_bytes", "held_params", "state_apart", "placements")})
    run["workers"] = gathered
    results[name] = run
    print(name, time.time() - started, flush=True)

if world == 2:
    results["resumed"] = resumed_losses(
        out, prepare=onegpu.prepare, rank=rank, plan=Plan(dp=2, sharding="optimizer", offload="optimizer")
    )
    model = SkipNet(depth=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = onegpu.prepare(model, optimizer, plan=Plan(dp=2, sharding="optimizer"))
    try:  # another worker's piece of the optimizer state
        optimizer.load_state_dict(torch.load(out / f"optimizer-{1 - rank}.pt"))
        results["wrong_piece"] = "loaded"
    except UsageError as error:
        results["wrong_piece"] = str(error)
    model = SkipNet(depth=3)
    try:  # an optimizer that is not elementwise
        onegpu.prepare(model, torch.optim.Adafactor(model.parameters()), plan=Plan(dp=2, sharding="optimizer"))
        results["adafactor"] = "accepted"
    except UsageError as error:
        results["adafactor"] = str(error)
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps(results))
