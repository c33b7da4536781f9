"""Training stopped, saved (model and optimizer state) and resumed in new objects: the loop a user writes."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from scenarios import Pairs, SkipNet
from torch.utils.data import DataLoader


def resumed_losses(directory: Path, *, prepare=None, rank: int = 0, **how) -> list[float]:
    """Four AdamW steps on SkipNet, a checkpoint (the model, this worker's optimizer.state_dict()), then four
    more steps in a new model and optimizer loaded from it; the eight losses."""
    losses: list[float] = []
    for part in range(2):
        torch.manual_seed(0)
        model = SkipNet(depth=3)
        if part:
            model.load_state_dict(load_file(directory / "model" / "model.safetensors"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loader = DataLoader(Pairs(), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(part))
        if prepare is not None:
            model, optimizer, loader = prepare(model, optimizer, loader, **how)
        if part:
            optimizer.load_state_dict(torch.load(directory / f"optimizer-{rank}.pt"))
        for x, y in loader:
            loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        if not part:
            import onegpu

            onegpu.save_pretrained(model, directory / "model")
            torch.save(optimizer.state_dict(), directory / f"optimizer-{rank}.pt")
            if torch.distributed.is_initialized():  # rank 0 wrote the model alone
                torch.distributed.barrier()
    return losses
