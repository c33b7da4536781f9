"""Worker script: the BatchNorm CNN through onegpu (DDP, FSDP, a user's SyncBatchNorm, checkpointing, the planner's
choice) and the pipelines it must refuse; rank 0 writes results.json and one checkpoint per run."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from batch_norm_cnn import BatchNormCNN, build, images, train  # noqa: E402
from scenarios import checkpointed_blocks  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import onegpu  # noqa: E402
from onegpu.errors import UsageError  # noqa: E402
from onegpu.plan import Plan  # noqa: E402

out = Path(sys.argv[1])
world = int(os.environ.get("WORLD_SIZE", "1"))
runs = {"ddp": {"strategy": "ddp"}, "fsdp": {"strategy": "fsdp"}}
if world == 2:
    runs["sync-ddp"] = {"strategy": "ddp", "sync": True}
    runs["zero3-sync"] = {"plan": Plan(dp=2, sharding="parameters"), "sync": True}
    runs["ddp-checkpoint"] = {"plan": Plan(dp=2, activation_checkpointing="full")}
results = {}
for name, how in runs.items():
    run = train(prepare=onegpu.prepare, **how)
    model = run.pop("model")
    run["norm_class"] = type(model.norm).__name__
    run["checkpointed_blocks"] = checkpointed_blocks(model)
    run["norm_is_users_class"] = isinstance(model.norm, type(build(sync=how.get("sync", False)).norm))
    onegpu.save_pretrained(model, out / name)
    results[name] = run


def refusal(**how) -> str | None:
    """The error preparing the CNN under a pipeline gives, or None if it was accepted."""
    loader = DataLoader(images(), batch_size=8)
    model = BatchNormCNN()
    try:
        onegpu.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, **how)
    except UsageError as error:
        return str(error)
    finally:
        onegpu.disable_advanced_parallelization()
    return None


if world == 2:
    results["refused-given-pp"] = refusal(plan=Plan(dp=1, pp=2, microbatches=2, schedule="gpipe"))
    onegpu.enable_advanced_parallelization(pp=2)
    results["refused-pinned-pp"] = refusal()
    onegpu.enable_advanced_parallelization()  # the planner's choice (it splits batches evenly)
    run = train(prepare=onegpu.prepare, batch=8)
    onegpu.disable_advanced_parallelization()
    results["advanced"] = run | {"plan": run.pop("model").onegpu_plan.config_dict()}
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps(results))
