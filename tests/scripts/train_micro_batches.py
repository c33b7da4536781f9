"""Worker script: plans with micro-batches and no pipeline (gradient accumulation inside the model's call), on 2
workers (data parallel) or 4 (data x tensor parallel); rank 0 writes results.json and the checkpoints."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from own_batches import nanogpt  # noqa: E402
from scenarios import train  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402

import onegpu  # noqa: E402
from onegpu.plan import Plan  # noqa: E402

out = Path(sys.argv[1])
world = int(os.environ.get("WORLD_SIZE", "1"))
reductions: list[int] = []  # gradient reductions (all-reduces, reduce-scatters of fp32 buffers) per optimizer step
units: list[int] = []  # FSDP2 units of the model prepared last (each reduces its gradients in one collective)


def count(tensor: torch.Tensor) -> None:
    if reductions and tensor.dtype == torch.float32 and tensor.numel() > 2:  # gradients, not onegpu's counts
        reductions[-1] += 1


_all_reduce, _reduce_scatter = dist.all_reduce, dist.reduce_scatter_single


def all_reduce(tensor, *args, **kwargs):
    count(tensor)
    return _all_reduce(tensor, *args, **kwargs)


def reduce_scatter_single(output, input, *args, **kwargs):
    count(input)
    return _reduce_scatter(output, input, *args, **kwargs)


dist.all_reduce, dist.reduce_scatter_single = all_reduce, reduce_scatter_single


def counting(*objects, **how):
    """``onegpu.prepare``, and a new count of reductions at every optimizer step."""
    prepared = onegpu.prepare(*objects, **how)
    model = next(o for o in prepared if isinstance(o, torch.nn.Module))
    optimizer = next(o for o in prepared if isinstance(o, torch.optim.Optimizer))
    units[:] = [sum(isinstance(m, FSDPModule) for m in model.modules())]
    reductions[:] = [0]
    optimizer.register_step_post_hook(lambda *_: reductions.append(0))
    return prepared


def counted(run: dict) -> dict:
    return run | {"reductions_per_step": reductions[:-1], "units": units[0]}


BATCH = 10  # slices of 5 rows: micro-batches of 3 and 2 (k=2), of 2, 1, 1 and 1 (k=4)
results = {}
if world == 2:
    runs = {
        "hf-ddp-k2": ("hf", Plan(dp=2, microbatches=2)),
        "hf-fsdp-checkpoint-k4": (
            "hf",
            Plan(dp=2, microbatches=4, sharding="parameters", activation_checkpointing="full"),
        ),
        "custom-zero2-k2": ("custom", Plan(dp=2, microbatches=2, sharding="gradients")),
    }
    for name, (scenario, plan) in runs.items():
        run = train(scenario, prepare=counting, batch=BATCH, plan=plan)
        run.pop("loader")
        onegpu.save_pretrained(run.pop("model"), out / name)
        results[name] = counted(run)
    run = train(
        "external", prepare=counting, batch=BATCH, plan=Plan(dp=2, microbatches=2), loss_fn=torch.nn.functional.mse_loss
    )
    run.pop("loader")
    onegpu.save_pretrained(run.pop("model"), out / "external-loss_fn-k2")
    results["external-loss_fn-k2"] = counted(run)
    # nanoGPT's loop: batches drawn in the loop, (logits, loss), and its own accumulation over 2 calls per step
    results["nanogpt-fsdp-k2"] = counted(
        nanogpt(prepare=counting, plan=Plan(dp=2, microbatches=2, sharding="parameters"),
                count_items=lambda idx, targets: (targets != -1).sum())
    )  # fmt: skip
if world == 4:
    run = train("hf", prepare=counting, batch=BATCH, plan=Plan(dp=2, tp=2, microbatches=2))
    run.pop("loader")
    onegpu.save_pretrained(run.pop("model"), out / "hf-dp2-tp2-k2")
    results["hf-dp2-tp2-k2"] = counted(run)
if dist.get_rank() == 0:
    (out / "results.json").write_text(json.dumps(results))
