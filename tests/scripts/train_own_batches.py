"""Worker script: loops that build their own batches (no DataLoader) through onegpu; rank 0 writes results.json.

Every gradient reduction FSDP2 makes (a float32 all-reduce or reduce-scatter) is counted per optimizer step.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from own_batches import accumulated, external, get_batch, loader_copies, nanogpt  # noqa: E402

import onegpu  # noqa: E402
from onegpu.errors import UsageError  # noqa: E402
from onegpu.plan import Plan  # noqa: E402

out = Path(sys.argv[1])
world = int(os.environ.get("WORLD_SIZE", "1"))
reductions: list[int] = []


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


def counting_steps(prepare):
    """``prepare``, and a new count of reductions at every optimizer step of the optimizer it returns."""

    def wrapped(model, optimizer, **how):
        model, optimizer = prepare(model, optimizer, **how)
        reductions.append(0)
        optimizer.register_step_post_hook(lambda *_: reductions.append(0))
        return model, optimizer

    return wrapped


def run(loop, **how) -> dict:
    reductions.clear()
    result = loop(prepare=counting_steps(onegpu.prepare), **how)
    return result | {"reductions_per_step": reductions[:-1]}


results = {}
if world == 2:
    results["nanogpt-ddp"] = run(nanogpt, strategy="ddp")
    results["nanogpt-fsdp"] = run(nanogpt, strategy="fsdp")
    results["nanogpt-ddp-partial"] = run(nanogpt, strategy="ddp", accumulation=(3, 3, 1, 3))
    results["nanogpt-fsdp-partial"] = run(nanogpt, strategy="fsdp", accumulation=(3, 3, 1, 3))
    results["external-ddp"] = run(external, strategy="ddp")
    results["accumulated-pp2"] = run(
        accumulated, plan=Plan(dp=1, pp=2, microbatches=2, schedule="1f1b")
    )  # each call runs the whole pipeline
    results["nanogpt-pp2"] = run(nanogpt, plan=Plan(dp=1, pp=2, microbatches=2, schedule="1f1b"))
    try:  # a loop that seeds every worker differently draws different batches
        linear = torch.nn.Linear(8, 8)
        model, _ = onegpu.prepare(linear, torch.optim.SGD(linear.parameters()))
        torch.manual_seed(dist.get_rank())
        model(get_batch(4)[0].float())
        results["seeded-per-rank"] = "no error"
    except UsageError as error:
        results["seeded-per-rank"] = str(error)
    # dropout inside the model: each replica draws its own masks; the loop's random stream does not move
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    model, _ = onegpu.prepare(net, torch.optim.SGD(net.parameters()))
    state = torch.get_rng_state()
    dropped = model(torch.ones(4, 4))
    results["dropout"] = {
        "replicas_differ": not torch.equal(dropped[:2], dropped[2:]),
        "stream_kept": torch.equal(state, torch.get_rng_state()),
    }
if world == 3:
    results["nanogpt-ddp"] = run(nanogpt, strategy="ddp", accumulation=(3, 3, 3))
    results["nanogpt-fsdp"] = run(nanogpt, strategy="fsdp", accumulation=(2, 2, 2))
    results["external-fsdp"] = run(external, strategy="fsdp")
    copies = loader_copies(prepare=onegpu.prepare, strategy="ddp")
    every = [None] * world
    dist.all_gather_object(every, copies["rows"])
    results["loader-copies"] = copies | {"rows": every}
if dist.get_rank() == 0:
    (out / "results.json").write_text(json.dumps(results))
