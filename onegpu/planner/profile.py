"""What a model costs to train, per repeated block: the cost model's input, measured by the inspection."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from onegpu.batches import tensors_in
from onegpu.errors import UsageError
from onegpu.outputs import find_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_OPS = ("scaled_dot_product", "bmm")  # flash kernels, or the math path's batched matmuls


@dataclass(frozen=True)
class PartProfile:
    """One block (or the rest of the model) for one sample of ``seq_len`` tokens."""

    params: int
    fwd_flops: float
    bwd_flops: float
    activation_bytes: int  # saved for backward, no checkpointing
    boundary_bytes: int  # the block's input: all a checkpointed block keeps
    attention_flops: float = 0.0  # of fwd + bwd, in attention kernels (slower than plain GEMMs)
    ops: int = 0  # operators run in forward + backward (each costs a launch or an eager dispatch)
    # kept under selective recomputation: the input and the matmul, attention and reduction outputs
    # (parallel/checkpointing.py:KEPT_OPERATORS); None: not measured, and selective recomputation not planned
    selective_activation_bytes: int | None = None
    kept_ops: int = 0  # operators of the forward whose outputs selective recomputation keeps (not run again)

    def scaled(self, factor: float) -> PartProfile:
        selective = self.selective_activation_bytes
        return replace(
            self,
            fwd_flops=self.fwd_flops * factor,
            bwd_flops=self.bwd_flops * factor,
            activation_bytes=int(self.activation_bytes * factor),
            boundary_bytes=int(self.boundary_bytes * factor),
            attention_flops=self.attention_flops * factor,
            selective_activation_bytes=None if selective is None else int(selective * factor),
        )


@dataclass(frozen=True)
class ModelProfile:
    """A model's training costs, per sample of ``seq_len`` tokens, at one precision."""

    name: str
    seq_len: int
    precision: str
    blocks: tuple[PartProfile, ...]
    rest: PartProfile  # embeddings, final norm, head and loss
    param_bytes: int  # bytes of one parameter as stored
    analysed_blocks: int = 0  # blocks actually run (a config's shortened copy runs two)
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    vocab_size: int | None = None
    # False for a profile of parameter counts alone (the forward could not be inspected): no activation is
    # counted, and the memory model says so rather than counting none
    activations_measured: bool = True

    @classmethod
    def of_parameters(cls, model: nn.Module, *, name: str | None = None) -> ModelProfile:
        """What is known of a model whose forward could not be inspected: its parameters, as one part."""
        count = sum(p.numel() for p in model.parameters())
        rest = PartProfile(params=count, fwd_flops=0.0, bwd_flops=0.0, activation_bytes=0, boundary_bytes=0)
        return cls(name=name or type(model).__name__, seq_len=1, precision="fp32", blocks=(), rest=rest,
                   param_bytes=4, activations_measured=False)  # fmt: skip

    @functools.cached_property
    def typical_block(self) -> PartProfile:
        """The blocks' mean (the rest when there are none): the one the cost model repeats, so that a stage of
        every block holds exactly their parameters and activations."""
        if not self.blocks:
            return self.rest
        n, first = len(self.blocks), self.blocks[0]
        if all(b == first for b in self.blocks):
            return first
        selective = [b.selective_activation_bytes for b in self.blocks]
        return PartProfile(
            params=sum(b.params for b in self.blocks) / n,
            fwd_flops=sum(b.fwd_flops for b in self.blocks) / n,
            bwd_flops=sum(b.bwd_flops for b in self.blocks) / n,
            activation_bytes=sum(b.activation_bytes for b in self.blocks) / n,
            boundary_bytes=sum(b.boundary_bytes for b in self.blocks) / n,
            attention_flops=sum(b.attention_flops for b in self.blocks) / n,
            ops=sum(b.ops for b in self.blocks) // n,
            kept_ops=sum(b.kept_ops for b in self.blocks) // n,
            selective_activation_bytes=None if None in selective else sum(selective) / n,
        )

    @property
    def params(self) -> int:
        return self.rest.params + sum(b.params for b in self.blocks)

    @functools.cached_property
    def memo(self) -> dict:
        """Figures derived from this (frozen) profile, kept for its lifetime: the search asks for the same
        stage cuts of thousands of candidate plans."""
        return {}

    @functools.cached_property
    def flops_per_sample(self) -> float:
        """Forward + backward FLOPs of one sample, without recomputation."""
        return sum(p.fwd_flops + p.bwd_flops for p in (*self.blocks, self.rest))

    @property
    def activation_bytes_per_sample(self) -> int:
        """Bytes one sample's forward keeps for backward, every block and the rest, without checkpointing."""
        return self.rest.activation_bytes + sum(b.activation_bytes for b in self.blocks)

    def tp_degrees(self, candidates: list[int]) -> list[int]:
        """Tensor-parallel degrees that divide the heads, KV heads and hidden size (1 when unknown): the rule
        for a profile whose model's structure was not inspected."""
        if self.num_heads is None or self.hidden_size is None:
            return [1]
        kv = self.num_kv_heads or self.num_heads
        return [t for t in candidates if self.num_heads % t == 0 and kv % t == 0 and self.hidden_size % t == 0]


def optimizer_state_slots(optimizer: torch.optim.Optimizer | None) -> int:
    """How many parameter-sized tensors ``optimizer`` keeps per parameter (the cost model's
    ``Workload.optimizer_slots``)."""
    if optimizer is None:
        return 0
    name, defaults = type(optimizer).__name__, optimizer.defaults
    if name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam"):
        return 2 + int(bool(defaults.get("amsgrad")))
    if name == "SGD":
        return int(bool(defaults.get("momentum")))
    if name == "RMSprop":
        return 1 + int(bool(defaults.get("momentum"))) + int(bool(defaults.get("centered")))
    if name == "Adagrad":
        return 1
    return 2  # unknown optimizers: assume Adam-like


def per_block(counter: FlopCounterMode, names: dict[int, str], blocks: list[nn.Module], ops: tuple[str, ...] = ()):
    """FLOPs so far per block (None: outside blocks), of every op or only of ``ops``."""
    counts = counter.get_flop_counts()

    def flops(per_op: dict) -> float:
        return float(sum(v for op, v in per_op.items() if not ops or any(o in str(op) for o in ops)))

    total = flops(counts.get("Global", {}))
    out: dict[int | None, float] = {}
    for index, block in enumerate(blocks):
        key = next((k for k in counts if k.endswith(names[id(block)]) and k != "Global"), None)
        out[index] = flops(counts[key]) if key else 0.0
    out[None] = total - sum(out.values())
    return out


def attention_flops_of(counter: FlopCounterMode, names: dict[int, str], blocks: list[nn.Module]):
    return per_block(counter, names, blocks, ops=ATTENTION_OPS)


def loss_of(output: Any) -> torch.Tensor:
    """A scalar to run backward from: the model's loss (wherever its output keeps it), or the sum of its first
    output tensor."""
    loss = find_loss(output)
    if loss is None:
        tensors = [t for t in tensors_in(output) if t.is_floating_point()]
        if not tensors:
            raise UsageError("the model's output has no tensor to take a loss from: return a loss or a tensor")
        loss = tensors[0].float().sum()
    return loss
