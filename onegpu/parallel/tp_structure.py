"""Find a model's tensor-parallel structure from its data flow, not from module names.

One forward pass of the model on fake tensors (no memory, no values) records, inside its first
repeated block, which linear layers (``nn.Linear``, GPT-2's transposed ``Conv1D``) feed which,
and every operator on the way. A group of *column* layers whose outputs reach only one *row*
layer, through operators that never mix features across heads (element-wise functions, reshapes,
attention, rotary embeddings), can be split: the columns by output features, the row by input
features, with one all-reduce after the row. Attention q/k/v -> o and MLP gate/up -> down are
such groups. A column whose output is split in equal parts before use (GPT-2's fused qkv) is a
fused column: each worker takes its slice of every part. Heads come from the reshapes that
follow a column, and must divide among the workers. The token embedding is the embedding that
reads the input ids; the LM head is a linear layer outside the blocks whose outputs are as many
as the vocabulary; both are split by vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from onegpu.errors import UsageError
from onegpu.parallel.blocks import repeated_blocks

INPUT = "<block input>"
IDS = "<input ids>"
# operators that keep every feature of a split layer's output on its worker (heads stay whole)
HEAD_LOCAL = {
    "view", "_unsafe_view", "reshape", "transpose", "permute", "expand", "clone", "contiguous", "t",
    "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes", "unbind", "chunk", "cat",
    "mul", "add", "sub", "div", "neg", "silu", "gelu", "relu", "tanh", "sigmoid", "exp", "pow", "rsqrt",
    "_softmax", "_safe_softmax", "softmax", "bmm", "matmul", "mm", "baddbmm", "_to_copy", "native_dropout", "dropout",
    "where", "masked_fill", "copy", "detach", "alias", "expand_as", "type_as", "lift_fresh", "bernoulli",
    "empty_like", "zeros_like", "ones_like", "device", "sym_size", "sym_numel", "sym_stride", "dim", "is_same_size",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention", "scaled_dot_product_attention",
}  # fmt: skip


@dataclass(frozen=True)
class Group:
    """Column layers feeding one row layer; names relative to a block."""

    columns: tuple[str, ...]
    row: str
    parts: dict[str, int] = field(default_factory=dict)  # a fused column's number of equal parts
    heads: int | None = None  # attention heads of the first column that has heads (per part)


@dataclass(frozen=True)
class TensorParallelStructure:
    """What can be split over ``tp`` workers, and why the rest cannot."""

    tp: int
    blocks: tuple[str, ...] = ()  # names of the repeated blocks
    groups: tuple[Group, ...] = ()
    embedding: str | None = None
    head: str | None = None
    reasons: tuple[str, ...] = ()

    @property
    def found(self) -> bool:
        return bool(self.groups)


def is_linear(module: nn.Module) -> bool:
    """A layer computing ``x @ W (+ b)``: ``nn.Linear``, or a transposed one like GPT-2's ``Conv1D``."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.Linear)
        or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def output_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.nf


class _Recorder(TorchDispatchMode):
    """Which layers' outputs each operator's result depends on ("taint"), inside one block."""

    def __init__(self) -> None:
        super().__init__()
        self.taint: dict[int, frozenset[str]] = {}
        self.alive: list[torch.Tensor] = []  # ids stay unique while recording
        self.ops: list[tuple[str, frozenset[str], list[tuple[int, ...]], list[tuple[int, ...]]]] = []
        self.inside_layer = 0

    def mark(self, tensor: Any, sources: frozenset[str]) -> None:
        for t in tree_leaves(tensor):
            if isinstance(t, torch.Tensor):
                self.taint[id(t)] = sources
                self.alive.append(t)

    def of(self, value: Any) -> frozenset[str]:
        found: frozenset[str] = frozenset()
        for t in tree_leaves(value):
            if isinstance(t, torch.Tensor):
                found |= self.taint.get(id(t), frozenset())
        return found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.inside_layer:
            sources = self.of((args, kwargs))
            if sources:
                self.mark(out, sources)
                shapes = lambda v: [tuple(t.shape) for t in tree_leaves(v) if isinstance(t, torch.Tensor)]
                self.ops.append((func.overloadpacket.__name__.rstrip("_"), sources, shapes(args), shapes(out)))
        return out


def find_tensor_parallel(model: nn.Module, sample: Any, *, tp: int) -> TensorParallelStructure:
    """The structure of ``model`` that ``tp`` workers can split, found on fake tensors; ``sample`` is a
    batch as the model takes it (keyword arguments when a dict, positional ones when a sequence)."""
    blocks = repeated_blocks(model)
    if not blocks:
        return TensorParallelStructure(tp=tp, reasons=(f"{type(model).__name__} has no repeated blocks",))
    names = {m: n for n, m in model.named_modules()}
    block = blocks[0]
    layers = {n: m for n, m in block.named_modules() if n and is_linear(m)}
    recorder = _Recorder()
    layer_inputs: dict[str, frozenset[str]] = {}
    seen: dict[str, Any] = {}
    handles = []

    def enter_block(module, args, kwargs):
        recorder.mark(args[0] if args else kwargs["hidden_states"], frozenset({INPUT}))

    def leave_block(module, args, output):
        seen["block_output"] = recorder.of(output[0] if isinstance(output, (tuple, list)) else output)

    def enter_layer(name):
        def hook(module, args):
            layer_inputs[name] = recorder.of(args[0])
            recorder.inside_layer += 1

        return hook

    def leave_layer(name):
        def hook(module, args, output):
            recorder.inside_layer -= 1
            recorder.mark(output, frozenset({name}))

        return hook

    def find_embedding(module, args):
        if args and IDS in recorder.of(args[0]) and "embedding" not in seen:
            seen["embedding"] = names[module]

    handles.append(block.register_forward_pre_hook(enter_block, with_kwargs=True))
    handles.append(block.register_forward_hook(leave_block))
    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(enter_layer(name)))
        handles.append(layer.register_forward_hook(leave_layer(name)))
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            handles.append(module.register_forward_pre_hook(find_embedding))
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as fake, torch.no_grad():
            state = {
                n: torch.empty(t.shape, dtype=t.dtype) for n, t in (*model.named_parameters(), *model.named_buffers())
            }
            args, kwargs = tree_map(
                lambda t: fake.from_tensor(t) if isinstance(t, torch.Tensor) else t, _as_call(sample)
            )
            if "input_ids" in kwargs:
                recorder.mark(kwargs["input_ids"], frozenset({IDS}))
            with recorder:
                functional_call(model, state, args=args, kwargs=kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure means: no tensor parallelism, with the reason
        return TensorParallelStructure(
            tp=tp, reasons=(f"{type(model).__name__} could not be run on fake tensors: {type(exc).__name__}: {exc}",)
        )
    finally:
        for handle in handles:
            handle.remove()
    groups, reasons = _groups(layers, layer_inputs, recorder, seen.get("block_output", frozenset()), tp=tp)
    if not groups and not reasons:
        reasons = [f"no linear layers of {type(block).__name__} feed only one other linear layer"]
    embedding, head = _vocabulary_layers(model, blocks, seen.get("embedding"), tp=tp)
    return TensorParallelStructure(
        tp=tp,
        blocks=tuple(names[b] for b in blocks),
        groups=tuple(groups),
        embedding=embedding,
        head=head,
        reasons=tuple(reasons),
    )


def require_tensor_parallel(model: nn.Module, sample: Any, *, tp: int) -> TensorParallelStructure:
    """:func:`find_tensor_parallel`, failing with the reasons when nothing can be split."""
    structure = find_tensor_parallel(model, sample, tp=tp)
    if not structure.found:
        raise UsageError(
            f"{type(model).__name__} has no tensor-parallel structure ({'; '.join(structure.reasons)}): use tp=1"
        )
    return structure


def _as_call(sample: Any) -> tuple[tuple, dict]:
    if isinstance(sample, dict):
        return (), dict(sample)
    return (tuple(sample), {}) if isinstance(sample, (list, tuple)) else ((sample,), {})


def _groups(layers, layer_inputs, recorder: _Recorder, block_output, *, tp: int) -> tuple[list[Group], list[str]]:
    groups, reasons = [], []
    ours = set(layers) | {INPUT}
    for row, found in layer_inputs.items():
        sources = found & ours  # values from outside the block (masks, rotary tables) are the same everywhere
        columns = tuple(sorted(sources))
        if not columns or INPUT in sources or not set(columns) <= set(layers):
            continue
        others = [n for n, s in layer_inputs.items() if n != row and s & sources]
        block_output = block_output & ours
        if others or block_output & sources:
            reasons.append(f"{', '.join(columns)} also feed {', '.join(others) or 'the block output'}, not only {row}")
            continue
        mixing = sorted({op for op, taint, _, _ in recorder.ops if taint & sources and op not in HEAD_LOCAL})
        if mixing:
            reasons.append(f"{', '.join(columns)} -> {row} goes through {', '.join(mixing)}, which mixes features")
            continue
        parts, heads, problem = _shapes(columns, layers, recorder, tp=tp)
        if problem:
            reasons.append(f"{', '.join(columns)} -> {row}: {problem}")
            continue
        groups.append(Group(columns=columns, row=row, parts=parts, heads=heads))
    return groups, reasons


def _shapes(columns, layers, recorder: _Recorder, *, tp: int) -> tuple[dict[str, int], int | None, str | None]:
    """Fused parts and heads per column, from the splits and reshapes that follow it."""
    parts: dict[str, int] = {}
    heads: int | None = None
    for name in columns:
        features = output_features(layers[name])
        own = [(op, ins, outs) for op, taint, ins, outs in recorder.ops if taint == frozenset({name})]
        count = 1
        for op, ins, outs in own:
            if op in ("split", "split_with_sizes") and ins and ins[0][-1] == features and len(outs) > 1:
                if len({o[-1] for o in outs}) == 1:
                    count = len(outs)
                break
        part = features // count
        split_heads = [
            outs[0][-2]
            for op, ins, outs in own
            if op in ("view", "_unsafe_view", "reshape")
            and ins
            and ins[0][-1] == part
            and len(outs[0]) == len(ins[0]) + 1
            and outs[0][-2] * outs[0][-1] == part
        ]
        if count > 1:
            parts[name] = count
        if split_heads:
            if split_heads[0] % tp:
                return {}, None, f"{split_heads[0]} heads of {name} cannot be divided among {tp} workers"
            heads = heads or split_heads[0]
        elif part % tp:
            return {}, None, f"{part} output features of {name} cannot be divided among {tp} workers"
    return parts, heads, None


def _vocabulary_layers(model: nn.Module, blocks, embedding: str | None, *, tp: int) -> tuple[str | None, str | None]:
    if embedding is None:
        return None, None
    vocab = model.get_submodule(embedding).num_embeddings
    if vocab % tp:
        return None, None
    inside = {id(m) for b in blocks for m in b.modules()}
    head = next(
        (n for n, m in model.named_modules() if id(m) not in inside and is_linear(m) and output_features(m) == vocab),
        None,
    )
    return embedding, head
