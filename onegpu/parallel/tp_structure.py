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

from dataclasses import dataclass, field, replace
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
# of those, the operators that mix sequence positions: not allowed on a sequence-split residual stream
SEQUENCE_MIXING = {
    "bmm", "matmul", "mm", "baddbmm", "_softmax", "_safe_softmax", "softmax", "cat",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention", "scaled_dot_product_attention",
}  # fmt: skip
REDUCTIONS = {"mean", "sum", "var", "var_mean", "amax", "amin", "std"}  # per token when over the last dimension
PER_TOKEN_NORMS = {"native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm"}


@dataclass(frozen=True)
class Group:
    """Column layers feeding one row layer; names relative to a block."""

    columns: tuple[str, ...]
    row: str
    parts: dict[str, int] = field(default_factory=dict)  # a fused column's number of equal parts
    heads: int | None = None  # attention heads of the first column that has heads (per part)
    parent: str = ""  # the module holding the columns and the row
    parent_input: int | str = 0  # where the parent takes the hidden states: position, or keyword
    parent_positional: int = 1  # how many positional arguments the parent takes


@dataclass(frozen=True)
class TensorParallelStructure:
    """What can be split over ``tp`` workers, and why the rest cannot."""

    tp: int
    blocks: tuple[str, ...] = ()  # names of the repeated blocks (to split: a pipeline stage's)
    first_block: str = ""  # the model's first block
    first_block_positional: int = 1  # how many positional arguments it takes
    groups: tuple[Group, ...] = ()
    embedding: str | None = None
    head: str | None = None
    reasons: tuple[str, ...] = ()
    # sequence parallelism: the residual stream between the groups split by sequence position
    sequence_parallel: bool = False
    norms: tuple[str, ...] = ()  # per-token layers of a block outside its groups (its norms)
    last_block: str = ""  # where the sequence is gathered again
    last_block_outputs: int = 0  # how many tensors the last block returns in a tuple; 0: a bare tensor

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
        self.arguments: list[list[Any]] = []  # each op's other arguments (reduction dimensions)
        self.inside_layer = 0
        self.recording = True  # off between the first block and the last one: the blocks are alike

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
                if not self.recording:
                    return out
                self.ops.append((func.overloadpacket.__name__.rstrip("_"), sources, shapes(args), shapes(out)))
                self.arguments.append([a for a in tree_leaves(args[1:]) if not isinstance(a, torch.Tensor)])
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
        seen["positional"] = len(args)
        recorder.mark(args[0] if args else kwargs["hidden_states"], frozenset({INPUT}))

    def leave_block(module, args, output):
        seen["block_output"] = recorder.of(output[0] if isinstance(output, (tuple, list)) else output)
        recorder.recording = len(blocks) == 1

    def leave_last_block(module, args, output):
        seen["last_outputs"] = len(output) if isinstance(output, (tuple, list)) else 0

    # module -> (where its hidden input is, its output's sources, how many positional arguments it takes)
    calls: dict[str, tuple[int | str | None, frozenset[str], int]] = {}

    def enter_module(name):
        def hook(module, args, kwargs):
            where = next((i for i, a in enumerate(args) if INPUT in recorder.of(a)), None)
            if where is None:
                where = next((k for k, a in kwargs.items() if INPUT in recorder.of(a)), None)
            calls[name] = (where, frozenset(), len(args))

        return hook

    def leave_module(name):
        def hook(module, args, output):
            calls[name] = (calls[name][0], recorder.of(output), calls[name][2])

        return hook

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
    handles.append(blocks[-1].register_forward_hook(leave_last_block))
    for name, module in block.named_modules():
        if name and not is_linear(module):
            handles.append(module.register_forward_pre_hook(enter_module(name), with_kwargs=True))
            handles.append(module.register_forward_hook(leave_module(name)))
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
    structure = TensorParallelStructure(
        tp=tp,
        blocks=tuple(names[b] for b in blocks),
        first_block=names[blocks[0]],
        groups=tuple(groups),
        embedding=embedding,
        head=head,
        reasons=tuple(reasons),
    )
    if groups and len(blocks) > 1 and seen.get("positional"):
        structure = _with_sequence_parallel(structure, block, calls, recorder, seen["block_output"])
        structure = replace(
            structure,
            first_block_positional=seen["positional"],
            last_block=names[blocks[-1]],
            last_block_outputs=seen["last_outputs"],
        )
    return structure


def _per_token(op: str, shapes: list[tuple[int, ...]], arguments: list[Any]) -> bool:
    """Whether an operator on the residual stream works on each sequence position alone."""
    if op in PER_TOKEN_NORMS:
        return True
    if op in REDUCTIONS:
        rank = len(shapes[0]) if shapes else 0
        dims = [a for a in arguments if isinstance(a, int) and not isinstance(a, bool)]
        return bool(dims) and all(d in (-1, rank - 1) for d in dims[:1])
    return op in HEAD_LOCAL and op not in SEQUENCE_MIXING


def _with_sequence_parallel(structure, block, calls, recorder: _Recorder, block_output):
    """``structure`` with sequence parallelism inside the blocks, when their residual stream around the groups
    works on each position alone (it is split by position between the first block and the last one)."""
    groups, rows, columns = [], set(), set()
    for group in structure.groups:
        names = [*group.columns, group.row]
        parent = ".".join(_common_prefix([n.split(".")[:-1] for n in names]))
        where, output, positional = calls.get(parent, (None, frozenset(), 0))
        if not parent or where is None or output - {group.row}:
            return replace(structure, reasons=(*structure.reasons, f"no sequence parallelism: {group.row} "
                                               "is not the last layer of the module holding its group"))  # fmt: skip
        groups.append(replace(group, parent=parent, parent_input=where, parent_positional=positional))
        rows.add(group.row)
        columns.update(group.columns)
    if block_output - {INPUT} - rows:
        return replace(structure, reasons=(*structure.reasons, "no sequence parallelism: the block output mixes more"))
    for (op, taint, shapes, _), arguments in zip(recorder.ops, recorder.arguments):
        residual = INPUT in taint and not taint & columns
        if residual and not _per_token(op, shapes, arguments):
            return replace(structure, reasons=(*structure.reasons, f"no sequence parallelism: {op} mixes positions"))
    parents = [g.parent for g in groups]
    norms = tuple(
        name
        for name, module in block.named_modules()
        if name
        and next(module.children(), None) is None
        and next(module.parameters(False), None) is not None
        and not is_linear(module)
        and not any(name.startswith(p + ".") for p in parents)
    )
    return replace(structure, groups=tuple(groups), sequence_parallel=True, norms=norms)


def _common_prefix(paths: list[list[str]]) -> list[str]:
    prefix = paths[0]
    for path in paths[1:]:
        same = 0
        while same < min(len(prefix), len(path)) and prefix[same] == path[same]:
            same += 1
        prefix = prefix[:same]
    return prefix


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
