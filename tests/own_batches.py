"""Single-device loops that build their own batches (no DataLoader), written once and run both as a plain
process (``prepare=None``) and through onegpu (``prepare=onegpu.prepare``).

``nanogpt``: a small GPT in nanoGPT's shape (``forward(idx, targets=None)`` returns ``(logits, loss)``,
cross-entropy with ``ignore_index=-1``, tied embeddings, its own ``configure_optimizers``) trained by
nanoGPT's loop: ``get_batch`` draws random offsets with ``torch.randint``, gradients accumulate over
``k`` calls, clipped, AdamW. ``external``: an MLP whose loss the loop computes from the model's output
and targets it built itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 8
    vocab_size: int = 61
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 16
    dropout: float = 0.0  # 0 for exactness: dropout masks cannot be one device's
    bias: bool = False  # nanoGPT's option; a key bias's gradient is zero but for rounding, which AdamW magnifies


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(config.n_embd, bias=config.bias), CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias),
            nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias),
            nn.Dropout(config.dropout),
        )

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, idx, targets=None):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float]):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


TOKENS = torch.randint(0, GPTConfig.vocab_size, (500,), generator=torch.Generator().manual_seed(7))


def get_batch(batch_size: int, block_size: int = GPTConfig.block_size, device: str = "cpu"):
    ix = torch.randint(len(TOKENS) - block_size - 1, (batch_size,))
    x = torch.stack([TOKENS[i : i + block_size] for i in ix])
    y = torch.stack([TOKENS[i + 1 : i + 1 + block_size] for i in ix])
    return x.to(device), y.to(device)


def parameters_of(model: nn.Module) -> dict[str, list]:
    """Every parameter's full value (gathered from shards), as lists: call on every worker."""
    if "onegpu_pipeline" in model.__dict__:  # each worker holds its stages: rank 0 gathers them
        from onegpu.runtime.pipelined import pipeline_state_dict

        return {name: value.tolist() for name, value in pipeline_state_dict(model).items()}
    full = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        full[name] = p.detach().cpu().tolist()
    return full


def nanogpt(*, prepare=None, batch: int = 8, accumulation=(2, 2, 2, 2), **how) -> dict:
    """nanoGPT's loop: ``len(accumulation)`` optimizer steps, each after that many micro-steps."""
    torch.manual_seed(1337)
    model = GPT(GPTConfig())
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95))
    if prepare is not None:
        model, optimizer = prepare(model, optimizer, **how)
    losses, norms = [], []
    X, Y = get_batch(batch)
    for k in accumulation:
        for _ in range(k):
            logits, loss = model(X, Y)
            loss = loss / k
            X, Y = get_batch(batch)  # prefetched before backward, as nanoGPT does
            loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() * k)
    return {
        "losses": losses,
        "grad_norms": norms,
        "parameters": parameters_of(model),
        "rows": logits.shape[0] if torch.is_tensor(logits) else None,
    }


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))

    def forward(self, x):
        return self.net(x)


def external(*, prepare=None, batch: int = 7, steps: int = 4, **how) -> dict:
    """The loss computed outside the model, from the loop's own targets: ``F.cross_entropy(model(x), y)``."""
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if prepare is not None:
        model, optimizer = prepare(model, optimizer, **how)
    losses, norms, rows = [], [], []
    for _ in range(steps):
        x, y = torch.randn(batch, 8), torch.randint(0, 5, (batch,))
        out = model(x)
        rows.append(out.shape[0])
        loss = F.cross_entropy(out, y)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "grad_norms": norms, "parameters": parameters_of(model), "rows": rows}


def accumulated(*, prepare=None, batch: int = 6, accumulation=(2, 2, 2), **how) -> dict:
    """A model with its own loss (SkipNet: blocks, a bare loss), tensors drawn in the loop, ``(loss / k).backward()``."""
    from scenarios import SkipNet

    torch.manual_seed(0)
    model = SkipNet(depth=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if prepare is not None:
        model, optimizer = prepare(model, optimizer, **how)
    losses = []
    for k in accumulation:
        for _ in range(k):
            x, y = torch.randn(batch, 8), torch.randn(batch, 1)
            loss = model(x, y) / k
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item() * k)
    return {"losses": losses, "grad_norms": [], "parameters": parameters_of(model), "rows": batch}


def loader_copies(*, prepare=None, batch: int = 7, **how) -> dict:
    """A DataLoader's batches copied before the model sees them (``x.clone()``): still slices, not sliced again."""
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.utils.data.TensorDataset(torch.randn(28, 8), torch.randint(0, 5, (28,)))
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    if prepare is not None:
        model, optimizer, loader = prepare(model, optimizer, loader, **how)
    rows = []
    for x, y in loader:
        out = model(x.clone())
        rows.append(out.shape[0])
        F.cross_entropy(out, y).backward()  # the slice's own loss: weighted by its share of the batch
        optimizer.step()
        optimizer.zero_grad()
    return {"losses": [], "grad_norms": [], "parameters": parameters_of(model), "rows": rows}
