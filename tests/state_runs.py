"""Training stopped with onegpu.save_state and continued with onegpu.load_state, written once as a user's loop
and run as a plain process (``prepare=None``: the uninterrupted reference) or through onegpu on any plan.

Two epochs of 4 steps (20 samples, global batches of 5); each step records its loss and the ids (dataset
indices) of the samples the worker's slice held (so the test can check every sample is seen once per epoch).
"""

from __future__ import annotations

import torch
from scenarios import HF, build
from torch import nn
from torch.utils.data import DataLoader, Dataset

STEPS, BATCH = 8, 5


def sample_ids(data: Dataset):
    """A function from a batch to the indices of its samples (found by their first tensor's values)."""
    first = lambda sample: sample["input_ids"] if isinstance(sample, dict) else sample[0]
    index = {tuple(first(data[i]).tolist()): i for i in range(len(data))}
    return lambda batch: [index[tuple(row)] for row in first(batch).tolist()]


class DropNet(nn.Module):
    """A hand-written model with dropout: its masks are random numbers the state must restore."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.drop, self.out = nn.Linear(8, 32), nn.Dropout(0.3), nn.Linear(32, 1)

    def forward(self, x, y):
        return nn.functional.mse_loss(self.out(self.drop(torch.tanh(self.inp(x)))), y)


def build_run(scenario: str):
    if scenario == "dropnet":
        from scenarios import Pairs

        torch.manual_seed(0)
        return DropNet(), Pairs()
    return build(scenario)


def train_state(scenario: str, *, prepare=None, directory=None, stop: int | None = None, resume: bool = False,
                asynchronous: bool = False, **how) -> dict:  # fmt: skip
    """Train ``scenario`` from a fresh start (or from the state in ``directory`` when ``resume``), saving there
    after step ``stop``. Returns the steps run, ``{step: (loss, sample ids)}``, and where it started."""
    import onegpu

    model, data = build_run(scenario)
    if scenario in ("gpt2", "gpt2-odd"):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    ids_of = sample_ids(data)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1))
    if prepare is not None:
        model, optimizer, scheduler, loader = prepare(model, optimizer, scheduler, loader, **how)
    start = onegpu.load_state(directory) if resume else None
    epoch = onegpu.saved_extra()["epoch"] if start is not None else 0
    step, steps = start or 0, {}
    model.train()
    while step < STEPS:
        for batch in loader:
            loss = model(**batch).loss if scenario in HF else model(*batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            steps[step] = (loss.item(), ids_of(batch))
            if step == stop:  # and go on: the run is the uninterrupted one on this plan
                onegpu.save_state(directory, step=step, epoch=epoch, asynchronous=asynchronous)
            step += 1
        epoch += 1
    return {"start": start, "steps": steps}
