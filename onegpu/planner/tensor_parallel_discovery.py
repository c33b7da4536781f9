"""Find a model's tensor-parallel structure from its data flow, not from module names.

During the inspection's forward pass (:mod:`onegpu.planner.inspection`), a recorder follows, inside
the first repeated block, which linear layers (``nn.Linear``, GPT-2's transposed ``Conv1D``) feed
which, and every operator on the way. A group of *column* layers whose outputs reach only one *row*
layer, through operators that never mix features across heads (element-wise functions, reshapes,
attention, rotary embeddings), can be split: the columns by output features, the row by input
features, with one all-reduce after the row. Attention q/k/v -> o and MLP gate/up -> down are such
groups. A column whose output is split in equal parts before use (GPT-2's fused qkv) is a fused
column: each worker takes its slice of every part. Heads come from the reshapes that follow a
column. The token embedding is the embedding that reads the input ids; the LM head is a linear layer
outside the blocks with as many outputs as the vocabulary. What ``tp`` workers can split is then
:meth:`TensorParallelFindings.layout`: the groups whose heads (or features) divide by ``tp``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from onegpu.parallel.linear_layers import is_linear, output_features
from onegpu.plan import TensorParallelGroup, TensorParallelLayout
from onegpu.planner.taint import Taint

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
class Candidate:
    """A group before the tensor-parallel degree is known: its layers' output features and heads."""

    group: TensorParallelGroup
    features: tuple[tuple[str, int], ...]  # each column's output features (of one part)
    heads: tuple[tuple[str, int], ...]  # each column's heads, where reshapes show them


@dataclass(frozen=True)
class TensorParallelFindings:
    """What the data flow allows, whatever the degree; ``layout(tp)`` is what ``tp`` workers can split."""

    candidates: tuple[Candidate, ...] = ()
    reasons: tuple[str, ...] = ()  # why other layers cannot be split
    embedding: str | None = None
    vocabulary: int | None = None
    head: str | None = None
    sequence_parallel: bool = False
    norms: tuple[str, ...] = ()
    first_block_positional: int = 1
    last_block_outputs: int = 0

    def layout(self, tp: int) -> tuple[TensorParallelLayout | None, tuple[str, ...]]:
        """The layout ``tp`` workers split, and why anything else is not split (None: nothing can be)."""
        groups, reasons = [], list(self.reasons)
        for candidate in self.candidates:
            problem = next(
                (
                    f"{heads} heads of {name} cannot be divided among {tp} workers"
                    for name, heads in candidate.heads
                    if heads % tp
                ),
                None,
            )
            if problem is None and not candidate.heads:
                problem = next(
                    (
                        f"{features} output features of {name} cannot be divided among {tp} workers"
                        for name, features in candidate.features
                        if features % tp
                    ),
                    None,
                )
            if problem:
                reasons.append(f"{', '.join(candidate.group.columns)} -> {candidate.group.row}: {problem}")
            else:
                groups.append(candidate.group)
        if not groups:
            return None, tuple(reasons)
        return (
            TensorParallelLayout(  # a vocabulary tp does not divide is padded (parallel/tensor_parallel.py)
                groups=tuple(groups),
                embedding=self.embedding,
                head=self.head,
                sequence_parallel=self.sequence_parallel,
                norms=self.norms,
                first_block_positional=self.first_block_positional,
                last_block_outputs=self.last_block_outputs,
            ),
            tuple(reasons),
        )


class TensorParallelRecorder(TorchDispatchMode):
    """Records, during one forward pass, which layers' outputs each operator's result depends on
    ("taint") inside the first block; ``findings()`` then reads the structure off the record."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.model, self.blocks = model, blocks
        self.names = {m: n for n, m in model.named_modules()}
        self.layers = {n: m for n, m in blocks[0].named_modules() if n and is_linear(m)}
        self.taint = Taint()
        self.ops: list[tuple[str, frozenset[str], list[tuple[int, ...]], list[tuple[int, ...]]]] = []
        self.arguments: list[list[Any]] = []  # each op's other arguments (reduction dimensions)
        self.inside_layer = 0
        self.recording = True  # off from the end of the first block: the blocks are alike
        self.layer_inputs: dict[str, frozenset[str]] = {}
        # module -> (where its hidden input is, its output's sources, how many positional arguments it takes)
        self.calls: dict[str, tuple[int | str | None, frozenset[str], int]] = {}
        self.seen: dict[str, Any] = {}
        self.handles: list[Any] = []

    def mark(self, value: Any, sources: frozenset[str]) -> None:
        self.taint.mark(value, sources)

    def of(self, value: Any) -> frozenset[str]:
        return self.taint.of(value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.recording and not self.inside_layer:
            sources = self.of((args, kwargs))
            if sources:
                self.mark(out, sources)
                shapes = lambda v: [tuple(t.shape) for t in tree_leaves(v) if isinstance(t, torch.Tensor)]
                self.ops.append((func.overloadpacket.__name__.rstrip("_"), sources, shapes(args), shapes(out)))
                self.arguments.append([a for a in tree_leaves(args[1:]) if not isinstance(a, torch.Tensor)])
        return out

    # --- hooks -----------------------------------------------------------------------------------
    def attach(self, inputs: dict[str, Any]) -> None:
        """Install the hooks that mark the block's input, its layers' outputs and the input ids."""
        block = self.blocks[0]
        if torch.is_tensor(inputs.get("input_ids")):
            self.mark(inputs["input_ids"], frozenset({IDS}))
        self.handles.append(block.register_forward_pre_hook(self._enter_block, with_kwargs=True))
        self.handles.append(block.register_forward_hook(self._leave_block))
        self.handles.append(self.blocks[-1].register_forward_hook(self._leave_last_block))
        for name, module in block.named_modules():
            if name and not is_linear(module):
                self.handles.append(module.register_forward_pre_hook(self._enter_module(name), with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._leave_module(name)))
        for name, layer in self.layers.items():
            self.handles.append(layer.register_forward_pre_hook(self._enter_layer(name)))
            self.handles.append(layer.register_forward_hook(self._leave_layer(name)))
        for module in self.model.modules():
            if isinstance(module, nn.Embedding):
                self.handles.append(module.register_forward_pre_hook(self._find_embedding))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.recording = False

    def _enter_block(self, module, args, kwargs):
        self.seen["positional"] = len(args)
        self.mark(args[0] if args else kwargs["hidden_states"], frozenset({INPUT}))

    def _leave_block(self, module, args, output):
        self.seen["block_output"] = self.of(output[0] if isinstance(output, (tuple, list)) else output)
        self.recording = len(self.blocks) == 1

    def _leave_last_block(self, module, args, output):
        self.seen["last_outputs"] = len(output) if isinstance(output, (tuple, list)) else 0
        self.recording = False

    def _enter_module(self, name: str):
        def hook(module, args, kwargs):
            where = next((i for i, a in enumerate(args) if INPUT in self.of(a)), None)
            if where is None:
                where = next((k for k, a in kwargs.items() if INPUT in self.of(a)), None)
            self.calls[name] = (where, frozenset(), len(args))

        return hook

    def _leave_module(self, name: str):
        def hook(module, args, output):
            self.calls[name] = (self.calls[name][0], self.of(output), self.calls[name][2])

        return hook

    def _enter_layer(self, name: str):
        def hook(module, args):
            self.layer_inputs[name] = self.of(args[0])
            self.inside_layer += 1

        return hook

    def _leave_layer(self, name: str):
        def hook(module, args, output):
            self.inside_layer -= 1
            self.mark(output, frozenset({name}))

        return hook

    def _find_embedding(self, module, args):
        if args and IDS in self.of(args[0]) and "embedding" not in self.seen:
            self.seen["embedding"] = self.names[module]

    # --- reading the record ---------------------------------------------------------------------
    def findings(self) -> TensorParallelFindings:
        block_output = self.seen.get("block_output", frozenset())
        candidates, reasons = _candidates(self.layers, self.layer_inputs, self, block_output)
        if not candidates and not reasons:
            reasons = [f"no linear layers of {type(self.blocks[0]).__name__} feed only one other linear layer"]
        embedding, vocabulary, head = _vocabulary_layers(self.model, self.blocks, self.seen.get("embedding"))
        found = TensorParallelFindings(
            candidates=tuple(candidates),
            reasons=tuple(reasons),
            embedding=embedding,
            vocabulary=vocabulary,
            head=head,
            first_block_positional=self.seen.get("positional", 1),
            last_block_outputs=self.seen.get("last_outputs", 0),
        )
        if candidates and len(self.blocks) > 1 and self.seen.get("positional"):
            found = _with_sequence_parallel(found, self.blocks[0], self, block_output)
        return found


def _candidates(layers, layer_inputs, recorder: TensorParallelRecorder, block_output) -> tuple[list, list[str]]:
    candidates, reasons = [], []
    ours = set(layers) | {INPUT}
    block_output = block_output & ours
    for row, found in layer_inputs.items():
        sources = found & ours  # values from outside the block (masks, rotary tables) are the same everywhere
        columns = tuple(sorted(sources))
        if not columns or INPUT in sources or not set(columns) <= set(layers):
            continue
        others = [n for n, s in layer_inputs.items() if n != row and s & sources]
        if others or block_output & sources:
            reasons.append(f"{', '.join(columns)} also feed {', '.join(others) or 'the block output'}, not only {row}")
            continue
        mixing = sorted({op for op, taint, _, _ in recorder.ops if taint & sources and op not in HEAD_LOCAL})
        if mixing:
            reasons.append(f"{', '.join(columns)} -> {row} goes through {', '.join(mixing)}, which mixes features")
            continue
        candidates.append(_shapes(columns, row, layers, recorder))
    return candidates, reasons


def _shapes(columns: tuple[str, ...], row: str, layers, recorder: TensorParallelRecorder) -> Candidate:
    """Fused parts, features and heads per column, from the splits and reshapes that follow it."""
    parts, features, heads = [], [], []
    for name in columns:
        total = output_features(layers[name])
        own = [(op, ins, outs) for op, taint, ins, outs in recorder.ops if taint == frozenset({name})]
        count = 1
        for op, ins, outs in own:
            if op in ("split", "split_with_sizes") and ins and ins[0][-1] == total and len(outs) > 1:
                if len({o[-1] for o in outs}) == 1:
                    count = len(outs)
                break
        part = total // count
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
            parts.append((name, count))
        features.append((name, part))
        if split_heads:
            heads.append((name, split_heads[0]))
    group = TensorParallelGroup(columns=columns, row=row, parts=tuple(parts), heads=heads[0][1] if heads else None)
    return Candidate(group=group, features=tuple(features), heads=tuple(heads))


def _per_token(op: str, shapes: list[tuple[int, ...]], arguments: list[Any]) -> bool:
    """Whether an operator on the residual stream works on each sequence position alone."""
    if op in PER_TOKEN_NORMS:
        return True
    if op in REDUCTIONS:
        rank = len(shapes[0]) if shapes else 0
        dims = [a for a in arguments if isinstance(a, int) and not isinstance(a, bool)]
        return bool(dims) and all(d in (-1, rank - 1) for d in dims[:1])
    return op in HEAD_LOCAL and op not in SEQUENCE_MIXING


def _with_sequence_parallel(found: TensorParallelFindings, block, recorder: TensorParallelRecorder, block_output):
    """``found`` with sequence parallelism inside the blocks, when their residual stream around the groups
    works on each position alone (it is split by position between the first block and the last one)."""

    def without(reason: str) -> TensorParallelFindings:
        return replace(found, reasons=(*found.reasons, f"no sequence parallelism: {reason}"))

    candidates, rows, columns = [], set(), set()
    for candidate in found.candidates:
        group = candidate.group
        names = [*group.columns, group.row]
        parent = ".".join(_common_prefix([n.split(".")[:-1] for n in names]))
        where, output, positional = recorder.calls.get(parent, (None, frozenset(), 0))
        if not parent or where is None or output - {group.row}:
            return without(f"{group.row} is not the last layer of the module holding its group")
        group = replace(group, parent=parent, parent_input=where, parent_positional=positional)
        candidates.append(replace(candidate, group=group))
        rows.add(group.row)
        columns.update(group.columns)
    if block_output - {INPUT} - rows:
        return without("the block output mixes more")
    for (op, taint, shapes, _), arguments in zip(recorder.ops, recorder.arguments):
        residual = INPUT in taint and not taint & columns
        if residual and not _per_token(op, shapes, arguments):
            return without(f"{op} mixes positions")
    parents = [c.group.parent for c in candidates]
    norms = tuple(
        name
        for name, module in block.named_modules()
        if name
        and next(module.children(), None) is None
        and next(module.parameters(False), None) is not None
        and not is_linear(module)
        and not any(name.startswith(p + ".") for p in parents)
    )
    return replace(found, candidates=tuple(candidates), sequence_parallel=True, norms=norms)


def _common_prefix(paths: list[list[str]]) -> list[str]:
    prefix = paths[0]
    for path in paths[1:]:
        same = 0
        while same < min(len(prefix), len(path)) and prefix[same] == path[same]:
            same += 1
        prefix = prefix[:same]
    return prefix


def _vocabulary_layers(model: nn.Module, blocks, embedding: str | None) -> tuple[str | None, int | None, str | None]:
    """The token embedding, its vocabulary, and the LM head (a linear layer outside the blocks as wide)."""
    if embedding is None:
        return None, None, None
    vocabulary = model.get_submodule(embedding).num_embeddings
    inside = {id(m) for b in blocks for m in b.modules()}
    head = next(
        (
            n
            for n, m in model.named_modules()
            if id(m) not in inside and is_linear(m) and output_features(m) == vocabulary
        ),
        None,
    )
    return embedding, vocabulary, head
