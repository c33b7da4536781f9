"""Tensor parallelism with DTensor: a plan's tensor-parallel layout, split over a mesh dimension.

Columns and the LM head are column-parallel, rows and the token embedding row-parallel (the
embedding by vocabulary), with ``parallelize_module``. Between a group's columns and its row each
worker holds plain tensors with its own features (its heads), so the model's code runs unchanged.
A fused column (GPT-2's qkv) is permuted first so that each worker's contiguous shard holds its
slice of every part. A vocabulary that ``tp`` does not divide (GPT-2's 50257 tokens) is padded with
zero rows to a multiple of ``tp``, as Megatron does: no token reads them, the head's logits are cut
back to the vocabulary before anything sees them, so their gradients are zero and the loss, the
logits and every other gradient are the model's own. :class:`SplitChanges` undoes both for checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)
from torch.utils._pytree import tree_map

from onegpu.errors import UsageError
from onegpu.parallel.linear_layers import output_features
from onegpu.parallel.sequence_parallel import PositionSplit, SplitRow, sequence_styles
from onegpu.plan import TensorParallelLayout


class _TransposedColumn(ParallelStyle):
    """Column parallelism for a layer computing ``x @ weight`` with ``weight`` stored (in, out), like ``Conv1D``."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name, mod, mesh):
            for key, param in list(mod.named_parameters(recurse=False)):
                dim = 1 if key == "weight" else 0
                mod.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Shard(dim)])))

        def replicated_input(mod, inputs, mesh):
            return (DTensor.from_local(inputs[0], mesh, [Replicate()], run_check=False), *inputs[1:])

        def local_output(mod, output, mesh):
            return output.to_local()

        return distribute_module(module, device_mesh, partition, replicated_input, local_output)


class _Replicated(ParallelStyle):
    """A layer every worker computes whole (norms, position embeddings): its parameters become replicated
    DTensors, so that every parameter of the model is a DTensor (``clip_grad_norm_`` needs one kind)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name, mod, mesh):
            for key, param in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Replicate()])))

        def replicated_inputs(mod, inputs, mesh):
            return tree_map(
                lambda t: DTensor.from_local(t, mesh, [Replicate()], run_check=False) if _is_plain(t) else t, inputs
            )

        def local_outputs(mod, output, mesh):
            return tree_map(lambda t: t.to_local() if isinstance(t, DTensor) else t, output)

        return distribute_module(module, device_mesh, partition, replicated_inputs, local_outputs)


def _is_plain(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not isinstance(value, DTensor)


class _TransposedRow(ParallelStyle):
    """Row parallelism for a layer computing ``x @ weight`` with ``weight`` stored (in, out), like ``Conv1D``;
    its output summed whole (``Replicate``) or summed and split by sequence position (``Shard(1)``)."""

    def __init__(self, *, positions: PositionSplit | None = None) -> None:
        super().__init__()
        self.positions = positions

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name, mod, mesh):
            for key, param in list(mod.named_parameters(recurse=False)):
                placement = Shard(0) if key == "weight" else Replicate()
                mod.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [placement])))

        def sharded_input(mod, inputs, mesh):
            return (DTensor.from_local(inputs[0], mesh, [Shard(-1)], run_check=False), *inputs[1:])

        def summed_output(mod, output, mesh):
            summed = Replicate() if self.positions is None else self.positions.summed
            return output.redistribute(placements=[summed]).to_local()

        return distribute_module(module, device_mesh, partition, sharded_input, summed_output)


def _fused_order(features: int, *, parts: int, tp: int) -> torch.Tensor:
    """Output features reordered so that worker r's contiguous shard is its slice of every part."""
    part, chunk = features // parts, features // parts // tp
    return torch.tensor([p * part + r * chunk + i for r in range(tp) for p in range(parts) for i in range(chunk)])


def _output_dim(module: nn.Module, key: str) -> int:
    return 1 if key == "weight" and not isinstance(module, nn.Linear) else 0


def _permute_outputs(module: nn.Module, order: torch.Tensor) -> None:
    with torch.no_grad():
        for key, param in module.named_parameters(recurse=False):
            param.copy_(param.index_select(_output_dim(module, key), order.to(param.device)))


@dataclass(frozen=True)
class SplitChanges:
    """What splitting changed in the model's parameters, by name, to undo in a checkpoint: each fused
    column's output order and dimension, and the vocabulary's rows before padding."""

    orders: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)
    vocabulary: dict[str, int] = field(default_factory=dict)

    def undo(self, state: dict[str, Any]) -> dict[str, Any]:
        """A full state dict as the model's own: fused outputs in its order, without the padding rows."""
        for name, (order, dim) in self.orders.items():
            if name in state:
                state[name] = state[name].index_select(dim, torch.argsort(order))
        for name, rows in self.vocabulary.items():
            if name in state:
                state[name] = state[name][:rows]
        return state


def apply_tensor_parallel(
    model: nn.Module, layout: TensorParallelLayout, *, mesh: DeviceMesh, blocks: list[str], first: str, last: str
) -> SplitChanges:
    """Split ``model`` in place over the 1-D ``mesh``: the groups of ``blocks`` (the names of this worker's
    blocks; ``first`` and ``last`` name the model's), and the embedding and head where it holds them (their
    vocabulary padded to a multiple of the mesh's size). Returns what a checkpoint must undo."""
    tp = mesh.size()
    vocabulary = _pad_vocabulary(model, [n for n in (layout.embedding, layout.head) if _holds(model, n)], tp=tp)
    plan: dict[str, ParallelStyle] = {}
    orders: dict[str, tuple[torch.Tensor, int]] = {}
    part_sizes: dict[nn.Module, set[int]] = {}
    positions = PositionSplit(tp=tp, optional=first in blocks and last in blocks) if layout.sequence_parallel else None
    for block in blocks:
        plan.update(
            _block_plan(model, layout, block=block, tp=tp, orders=orders, part_sizes=part_sizes, positions=positions)
        )
    if positions is not None:
        plan.update(sequence_styles(layout, blocks=blocks, first=first, last=last, positions=positions))
    if _holds(model, layout.embedding):
        plan[layout.embedding] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if _holds(model, layout.head) and isinstance(model.get_submodule(layout.head), nn.Linear):
        plan[layout.head] = ColwiseParallel(output_layouts=Replicate())
    for parent, sizes in part_sizes.items():
        _divide_part_sizes(parent, sizes, tp)
    references = _parameter_references(model)
    parallelize_module(model, mesh, plan)
    _retie(references)
    if vocabulary and _holds(model, layout.head):
        rows = next(iter(vocabulary.values()))
        model.get_submodule(layout.head).register_forward_hook(lambda module, args, logits: logits[..., :rows])
    whole = {
        name: _Replicated()
        for name, module in model.named_modules()
        if any(_is_plain(p) for p in module.parameters(recurse=False))
    }
    if any(next(model.get_submodule(n).children(), None) is not None for n in whole):
        raise UsageError(
            f"{type(model).__name__} keeps parameters outside its leaf layers, which tensor parallelism cannot "
            "replicate yet: use tp=1"
        )
    parallelize_module(model, mesh, whole)
    _retie(references)
    return SplitChanges(orders=orders, vocabulary=vocabulary)


def _pad_vocabulary(model: nn.Module, names: list[str], *, tp: int) -> dict[str, int]:
    """Append zero rows to the vocabulary-parallel layers ``names`` (an embedding, a head: their weights, a
    head's bias) up to a multiple of ``tp``, in place; a parameter several modules share stays one. Returns
    the padded parameters' names (every name of each), with their rows before padding."""
    modules = [model.get_submodule(name) for name in names]
    if not modules:
        return {}
    first = modules[0]
    rows = first.num_embeddings if isinstance(first, nn.Embedding) else output_features(first)
    if rows % tp == 0:
        return {}
    padded: dict[int, nn.Parameter] = {}
    for module in modules:
        for param in module.parameters(recurse=False):
            if param.shape[0] == rows and id(param) not in padded:
                zeros = param.new_zeros(-rows % tp, *param.shape[1:])
                padded[id(param)] = nn.Parameter(torch.cat([param.detach(), zeros]), requires_grad=param.requires_grad)
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and id(param) in padded:
                module._parameters[key] = padded[id(param)]
    kept = {id(p) for p in padded.values()}
    return {name: rows for name, p in model.named_parameters(remove_duplicate=False) if id(p) in kept}


def _holds(model: nn.Module, name: str | None) -> bool:
    """Whether this worker holds module ``name`` (a pipeline stage leaves out the modules it does not use)."""
    from onegpu.parallel.pipeline import ShapeOnly

    if name is None:
        return False
    try:
        return not isinstance(model.get_submodule(name), ShapeOnly)
    except AttributeError:  # inside a module the stage left out
        return False


def _block_plan(model, layout: TensorParallelLayout, *, block: str, tp: int, orders, part_sizes, positions) -> dict:
    """The styles of one block's groups' columns and rows (``positions``: under sequence parallelism, whose rows
    reduce-scatter by position when the forward is split so; else they all-reduce)."""
    plan: dict[str, ParallelStyle] = {}
    for group in layout.groups:
        for column in group.columns:
            name = f"{block}.{column}"
            layer = model.get_submodule(name)
            plan[name] = ColwiseParallel() if isinstance(layer, nn.Linear) else _TransposedColumn()
            parts = group.parts_of(column)
            if parts > 1:
                order = _fused_order(output_features(layer), parts=parts, tp=tp)
                _permute_outputs(layer, order)
                for key, _ in layer.named_parameters(recurse=False):
                    orders[f"{name}.{key}"] = (order, _output_dim(layer, key))
            parent = model.get_submodule(name.rpartition(".")[0])
            part_sizes.setdefault(parent, set()).add(output_features(layer) // parts)
        row = f"{block}.{group.row}"
        if not isinstance(model.get_submodule(row), nn.Linear):
            plan[row] = _TransposedRow(positions=positions)
        else:
            plan[row] = RowwiseParallel() if positions is None else SplitRow(positions)
    return plan


def _divide_part_sizes(parent: nn.Module, sizes: set[int], tp: int) -> None:
    """Sizes a columns' parent keeps of their outputs (GPT-2's ``split_size``) become each worker's share."""
    for key, value in list(vars(parent).items()):
        if not key.startswith("_") and type(value) is int and value in sizes:
            setattr(parent, key, value // tp)


def _parameter_references(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    references: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for key, param in module.named_parameters(recurse=False):
            references.setdefault(id(param), []).append((module, key))
    return {k: v for k, v in references.items() if len(v) > 1}


def _retie(references: dict[int, list[tuple[nn.Module, str]]]) -> None:
    """Parameters shared by several modules (tied embeddings) stay one parameter once split."""
    for places in references.values():
        split = next((getattr(m, k) for m, k in places if isinstance(getattr(m, k), DTensor)), None)
        if split is not None:
            for module, key in places:
                setattr(module, key, split)
