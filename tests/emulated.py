"""The emulated bf16 device every mixed-precision plan is compared with (PyTorch's FSDP2 mixed-precision tests
build theirs the same way): one plain process with an fp32 master model and a bf16 working copy of its
parameters (buffers stay fp32, as under FSDP2). Each step runs the slices the workers run (a replica's rows,
a pipeline's micro-batches) through the working copy, each slice's loss weighted by its share of the batch;
the bf16 gradients are cast to fp32 and summed in fp32; the fp32 optimizer steps the master, and the working
copy is cast from it again. It runs with the workers' threads (tests/conftest.py:run_onegpu): another thread
count sums a matmul in another fp32 order, which can flip a bf16 rounding. Like FSDP2, each block is a unit whose inputs pass one identity node: a tensor a
block and the code around it both use gets the block's gradient whole, then the rest (bf16 sums round by
their order).
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from scenarios import BATCH, HF, build
from torch.utils.data import DataLoader

from onegpu.batches import slice_batch
from onegpu.runtime.data import slice_bounds


def slices(batch: int, *, replicas: int = 1, microbatches: int = 1) -> list[tuple[int, int]]:
    """The rows each forward of a plan takes: every replica's slice, cut into its micro-batches."""
    rows = []
    for replica in range(replicas):
        start, end = slice_bounds(batch, rank=replica, world_size=replicas)
        rows += [
            (start + int(c[0]), start + int(c[-1]) + 1) for c in torch.arange(end - start).tensor_split(microbatches)
        ]
    return rows


BLOCKS = {"hf": "model.layers", "gpt2": "transformer.h", "custom": "blocks", "external": "blocks"}


class _UnitInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        return inputs

    @staticmethod
    def backward(ctx, *grads):
        return grads


def _as_units(model: torch.nn.Module, scenario: str) -> None:
    def enter(module, args, kwargs):
        positions = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad]
        passed = _UnitInput.apply(*(args[i] for i in positions)) if positions else ()
        args = list(args)
        for i, tensor in zip(positions, passed):
            args[i] = tensor
        return tuple(args), kwargs

    for block in model.get_submodule(BLOCKS[scenario]):
        block.register_forward_pre_hook(enter, with_kwargs=True)


def _label_tokens(batch: dict) -> int:
    return int((batch["labels"][..., 1:] != -100).sum())


def _weighted_loss(working, scenario: str, part, *, whole, dtype) -> torch.Tensor:
    """A slice's loss as a worker makes it: the model's loss (in fp32) times the slice's share of the batch."""
    if scenario in HF:  # a token loss is its share already: the global count divides it
        return working(**part, num_items_in_batch=torch.tensor(_label_tokens(whole))).loss.float()
    x, y = part
    share = len(x) / len(whole[0])
    return working(x.to(dtype), y.to(dtype)).float() * share


def train_emulated(scenario: str, *, replicas: int = 1, microbatches: int = 1, dtype=torch.bfloat16,
                   layers: int = 2, batch: int = BATCH) -> dict:  # fmt: skip
    """``scenarios.train`` (clipping, AdamW or GPT-2's SGD, the step schedule, an eval loss) on the emulated
    device; ``replicas`` and ``microbatches`` say which slices the plan's forwards take."""
    with _threads(int(os.environ.get("OMP_NUM_THREADS", "1"))):
        return _train(scenario, replicas=replicas, microbatches=microbatches, dtype=dtype, layers=layers, batch=batch)


@contextlib.contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(scenario: str, *, replicas: int, microbatches: int, dtype, layers: int, batch: int) -> dict:
    master, data = build(scenario, layers=layers)
    working = copy.deepcopy(master)
    for param in working.parameters():
        param.data = param.data.to(dtype)
    _as_units(working, scenario)
    if scenario in ("gpt2", "gpt2-odd"):
        optimizer = torch.optim.SGD(master.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(master.parameters(), lr=1e-2)
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    pairs = list(zip(master.parameters(), working.parameters()))
    losses, norms = [], []
    for _epoch in range(2):
        for whole in loader:
            size = len(whole["input_ids"]) if scenario in HF else len(whole[0])
            value, sums = 0.0, [None] * len(pairs)
            for start, end in slices(size, replicas=replicas, microbatches=microbatches):
                loss = _weighted_loss(working, scenario, slice_batch(whole, start, end), whole=whole, dtype=dtype)
                loss.backward()
                value += loss.item()
                for i, (_, low) in enumerate(pairs):
                    if low.grad is not None:  # cast to fp32, summed in fp32
                        sums[i] = low.grad.float() if sums[i] is None else sums[i] + low.grad.float()
                        low.grad = None
            for (high, _), grad in zip(pairs, sums):
                high.grad = grad
            norms.append(float(torch.nn.utils.clip_grad_norm_(master.parameters(), 1.0)))
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            losses.append(value)
            with torch.no_grad():
                for high, low in pairs:
                    low.copy_(high)
    with torch.no_grad():
        whole = next(iter(loader))
        size = len(whole["input_ids"]) if scenario in HF else len(whole[0])
        eval_loss = sum(
            _weighted_loss(working.eval(), scenario, slice_batch(whole, s, e), whole=whole, dtype=dtype).item()
            for s, e in slices(size, replicas=replicas, microbatches=microbatches)
        )
    return {"losses": losses, "grad_norms": norms, "eval_loss": eval_loss, "model": master}
