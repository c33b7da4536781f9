"""A BatchNorm CNN trained by a plain single-device loop: the loss computed outside the model, SGD with
momentum, then ``model.eval()``. Shared by the plain reference and the onegpu workers
(tests/scripts/train_batch_norm.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH = 7  # slices of 4/3 on 2 workers, 3/2/2 on 3
STEPS = 4
CLASSES = 4


class ConvBlock(nn.Module):
    """A residual block: conv + BatchNorm2d, added to its input, ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels, momentum=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.norm(self.conv(x)))


class BatchNormCNN(nn.Module):
    """conv + BatchNorm2d + ReLU, two residual blocks, pooling, a BatchNorm2d without weights or running
    statistics, then linear + BatchNorm1d (cumulative average) + ReLU + linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList(ConvBlock(8) for _ in range(2))
        self.pool = nn.MaxPool2d(2)
        self.spread = nn.BatchNorm2d(8, affine=False, track_running_stats=False)  # batch statistics in eval() too
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.norm = nn.BatchNorm1d(16, momentum=None)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        h = self.spread(self.pool(h)).flatten(1)
        return self.head(torch.relu(self.norm(self.fc(h))))


def images(samples: int = BATCH * STEPS) -> TensorDataset:
    """Images whose channels have means and scales of their own (the statistics matter), and labels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 3, 8, 8, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(3, 1, 1) + 2.0
    return TensorDataset(x, torch.randint(0, CLASSES, (samples,), generator=g))


def build(*, sync: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = BatchNormCNN()
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync else model


def global_mean(value: torch.Tensor, count: int) -> float:
    """A mean over this worker's ``count`` samples, made the whole batch's (the loop sees its slice)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return float(value)
    both = torch.tensor([float(value) * count, float(count)], dtype=torch.float64)
    dist.all_reduce(both)
    return float(both[0] / both[1])


def train(*, prepare=None, sync: bool = False, batch: int = BATCH, **how) -> dict:
    """Single-device training; returns the per-step losses, gradient norms, eval loss and the model."""
    model = build(sync=sync)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(images(), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1))
    if prepare is not None:
        model, optimizer, loader = prepare(model, optimizer, loader, **how)
    losses, norms = [], []
    model.train()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(global_mean(loss.detach(), len(y)))
    model.eval()
    with torch.no_grad():
        x, y = next(iter(loader))
        eval_loss = global_mean(F.cross_entropy(model(x), y), len(y))
    return {"losses": losses, "grad_norms": norms, "eval_loss": eval_loss, "model": model}
