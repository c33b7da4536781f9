"""A 12-step run that a job may interrupt, written once for the plain reference and the workers: a hand-written
model over a shuffled DataLoader (3 epochs of 4 global batches of 6), AdamW and a per-step LR schedule."""

from __future__ import annotations

import torch
from scenarios import Pairs, SkipNet
from torch.utils.data import DataLoader

STEPS, BATCH = 12, 6  # slices of 3/3 on 2 workers, 2/2/2 on 3


def build_run():
    """The model, its optimizer, its scheduler and its loader, the same on every run."""
    torch.manual_seed(0)
    model = SkipNet(depth=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    loader = DataLoader(Pairs(samples=24), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1))
    return model, optimizer, scheduler, loader


def train(model, optimizer, scheduler, loader, *, start: int = 0, after_step=None) -> dict[int, float]:
    """The loop a user writes: from step ``start`` to STEPS over epochs; ``after_step(step, loss)`` after each."""
    step, losses = start, {}
    while step < STEPS:
        for batch in loader:
            loss = model(*batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            losses[step] = loss.item()
            if after_step is not None:
                after_step(step, losses[step])
            step += 1
            if step == STEPS:
                break
    return losses


def reference() -> tuple[list[float], torch.nn.Module]:
    """The uninterrupted run in one plain process: its per-step losses and trained model."""
    model, optimizer, scheduler, loader = build_run()
    losses = train(model, optimizer, scheduler, loader)
    return [losses[step] for step in range(STEPS)], model
