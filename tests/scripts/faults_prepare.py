"""Single-device scripts that go wrong (or used to) in prepare(): faults_prepare.py MODE [ARG] [TAG].

Modes that must work write ARG, a JSON file (from rank 0), with what every worker saw; modes that must
fail end in onegpu's one line. A last argument starting with "badinput-" only tags the processes.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import onegpu

onegpu.init()
mode, *args = [a for a in sys.argv[1:] if not a.startswith("badinput-")]
torch.manual_seed(0)
x, y = torch.randn(12, 4), torch.randn(12, 1)


class ReadyBatches(IterableDataset):
    """A stream that yields whole batches, already collated (used with batch_size=None)."""

    def __iter__(self):
        for start in range(0, 12, 6):
            yield x[start : start + 6], y[start : start + 6]


class Samples(IterableDataset):
    """A stream of single samples (the DataLoader batches them)."""

    def __iter__(self):
        yield from zip(x, y)


def gathered(value):
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return every


def write(results) -> None:
    if onegpu.is_main_process():
        Path(args[0]).write_text(json.dumps(results))


def frozen() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).requires_grad_(False)


def evaluate(model: nn.Module, target: torch.Tensor, **options) -> dict:
    """Evaluation of a model with nothing to train: each worker its slice, the global loss on every one."""
    loader = DataLoader(TensorDataset(x, target), batch_size=6)
    mse = torch.nn.functional.mse_loss
    expected = [mse(model(a), b).item() for a, b in loader]
    model, loader = onegpu.prepare(model, loader, loss_fn=mse, **options)
    with torch.no_grad():
        losses = [model(a, target=b).item() for a, b in loader]
    return {"expected": expected, "losses": gathered(losses), "strategy": model.onegpu_plan.strategy}


def planned(model: nn.Module, target: torch.Tensor) -> dict:
    """The same evaluation with Advanced Parallelization on."""
    onegpu.enable_advanced_parallelization()
    try:
        return evaluate(model, target)
    finally:
        onegpu.disable_advanced_parallelization()


def slices(loader: DataLoader) -> None:
    """Each worker's rows of every batch (first feature), and the batches a single device sees."""
    _, loader = onegpu.prepare(nn.Linear(4, 1), loader)
    rows = [a[:, 0].tolist() for a, b in loader]
    write({"rows": gathered(rows), "batches": [x[start : start + 6, 0].tolist() for start in (0, 6)]})


def qwen2(**pins):
    """The issue's model: a Qwen2 of six layers (transformers derives its layer_types), under the planner."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=6,
    )
    model = Qwen2ForCausalLM(config)
    ids = torch.randint(0, 128, (8, 16))
    loader = DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=4)
    onegpu.enable_advanced_parallelization(**pins)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = onegpu.prepare(model, optimizer, loader)
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": gathered(losses), "plan": model.onegpu_plan.describe()}


def pin_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class Unpicklable(Exception):
    """Like huggingface_hub's validation errors: pickled with one argument, it cannot be rebuilt."""

    def __init__(self, validator: str, cause: str) -> None:
        super().__init__(f"{validator}: {cause}")


def fail_to_plan(*_, **__):
    raise Unpicklable("validate_architecture", "the layers do not add up")


if mode == "frozen":
    write(
        {
            "default": evaluate(frozen(), y),
            "fsdp": evaluate(frozen(), y, strategy="fsdp"),
            "advanced": planned(frozen(), y),
        }
    )
elif mode == "no-parameters":
    write({"default": evaluate(nn.ReLU(), x.abs())})
elif mode == "unfrozen":
    model, loader = onegpu.prepare(frozen(), DataLoader(TensorDataset(x, y), batch_size=6))
    model.requires_grad_(True)
    for a, b in loader:
        torch.nn.functional.mse_loss(model(a), b).backward()
elif mode == "ready-batches":
    slices(DataLoader(ReadyBatches(), batch_size=None))
elif mode == "streamed-samples":
    slices(DataLoader(Samples(), batch_size=6))
elif mode == "twice":
    model = nn.Linear(4, 1)
    onegpu.prepare(model)
    onegpu.prepare(model)
elif mode == "short-last-batch":  # 16 samples in batches of 7: the last one has 2
    onegpu.prepare(nn.Linear(4, 1), DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=7))
elif mode == "batch-below-workers":
    onegpu.prepare(nn.Linear(4, 1), DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=2))
elif mode == "qwen2-advanced":
    write(qwen2())
elif mode == "pins":  # ARGS: name=value, the value as JSON when it reads as JSON
    qwen2(**{name: pin_value(value) for name, value in (arg.split("=", 1) for arg in args)})
elif mode == "trials-with-plan":  # trials choose among the planner's plans: a plan given leaves nothing to try
    from onegpu.plan import Plan

    onegpu.enable_advanced_parallelization(trials=2)
    onegpu.prepare(nn.Linear(4, 1), DataLoader(TensorDataset(x, y), batch_size=6), plan=Plan(dp=2))
elif mode == "planner-error":
    import onegpu.api

    onegpu.api._searched = fail_to_plan
    qwen2()
else:
    raise SystemExit(f"unknown mode {mode}")
