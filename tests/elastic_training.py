"""A 12-step run that a job may interrupt, written once for the plain reference and the workers."""

from __future__ import annotations

import torch
from scenarios import SkipNet

STEPS, BATCH = 12, 6  # a global batch of 6: slices of 3/3 on 2 workers, 2/2/2 on 3


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = SkipNet(depth=3)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``, built in the loop (no DataLoader)."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 1, generator=g)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    loss = model(*batch_at(step))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def reference() -> tuple[list[float], torch.nn.Module]:
    """The uninterrupted run in one plain process: its per-step losses and trained model."""
    model, optimizer = build()
    return [train_step(model, optimizer, step) for step in range(STEPS)], model
