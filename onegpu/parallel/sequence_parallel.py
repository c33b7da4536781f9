"""Sequence parallelism around tensor-parallel groups: between the groups (norms, residuals) each of ``tp``
workers holds its part of the sequence's positions; a group's module gathers them, its row layer sums its
output and splits it by position again (a reduce-scatter instead of an all-reduce).

A forward whose sequence length ``tp`` does not divide (a prompt of 5 tokens, each decoding step of
``generate``: 1 token) runs the same split layers without the split by position, when the worker holds the
first and the last block (no pipeline): the :class:`PositionSplit` the first block sets decides, for that
forward, what every style here does. A pipeline stage cannot tell, and asks for padded batches instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle, RowwiseParallel, SequenceParallel

from onegpu.errors import UsageError

POSITIONS = Shard(1)


@dataclass
class PositionSplit:
    """Whether the forward under way splits the sequence by position (set by the first block)."""

    tp: int
    optional: bool  # the worker holds the first and the last block: an uneven length runs unsplit
    split: bool = True

    def decide(self, length: int) -> None:
        if length % self.tp == 0:
            self.split = True
        elif self.optional:
            self.split = False
        else:
            raise UsageError(
                f"sequence parallelism over {self.tp} workers needs a sequence length that is a multiple of "
                f"{self.tp}, not {length}: pad the batches to a multiple of {self.tp}"
            )

    @property
    def summed(self):
        """How a row layer's partial sums are combined: reduce-scattered by position, or all-reduced."""
        return POSITIONS if self.split else Replicate()


def _split(tensor, mesh: DeviceMesh):
    return DTensor.from_local(tensor, mesh, [Replicate()], run_check=False).redistribute(placements=[POSITIONS])


def _gathered(tensor, mesh: DeviceMesh):
    return DTensor.from_local(tensor, mesh, [POSITIONS], run_check=False).redistribute(placements=[Replicate()])


class SplitRow(RowwiseParallel):
    """Row parallelism whose output is split by position when the forward is (else summed whole)."""

    def __init__(self, positions: PositionSplit) -> None:
        super().__init__(output_layouts=POSITIONS)
        self.positions = positions

    def _prepare_output_fn(self, output_layouts, use_local_output, mod, outputs, device_mesh):  # noqa: ARG002
        return RowwiseParallel._prepare_output_fn((self.positions.summed,), use_local_output, mod, outputs, device_mesh)


class SplitNorm(SequenceParallel):
    """A per-token layer (a norm) on the positions this worker holds, or on all of them."""

    def __init__(self, positions: PositionSplit) -> None:
        super().__init__(use_local_output=True)
        self.positions = positions

    def _prepare_input_fn(self, sequence_sharding, mod, inputs, device_mesh):  # noqa: ARG002
        placement = POSITIONS if self.positions.split else Replicate()
        return DTensor.from_local(inputs[0], device_mesh, [placement], run_check=False)


class _Hooks(ParallelStyle):
    """Plain forward hooks (no parameter is distributed) that see the forward's :class:`PositionSplit`."""

    def __init__(self, positions: PositionSplit, *, where: int | str = 0, roles: tuple[str, ...]) -> None:
        super().__init__()
        self.positions, self.where, self.roles = positions, where, roles

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        positions, where = self.positions, self.where

        def first(mod, args: tuple, kwargs: dict[str, Any]):
            positions.decide(args[0].shape[1])
            if not positions.split:
                return None
            return (_split(args[0], device_mesh).to_local(), *args[1:]), kwargs

        def gather(mod, args: tuple, kwargs: dict[str, Any]):
            if not positions.split:
                return None
            if isinstance(where, str):
                return args, {**kwargs, where: _gathered(kwargs[where], device_mesh).to_local()}
            given = list(args)
            given[where] = _gathered(given[where], device_mesh).to_local()
            return tuple(given), kwargs

        def last(mod, args: tuple, output: Any):
            if not positions.split:
                return output
            if isinstance(output, tuple):
                return (_gathered(output[0], device_mesh).to_local(), *output[1:])
            return _gathered(output, device_mesh).to_local()

        hooks = {"first": first, "gather": gather}
        for role in self.roles:
            if role == "last":
                module.register_forward_hook(last)
            else:
                module.register_forward_pre_hook(hooks[role], with_kwargs=True, prepend=True)
        return module


def sequence_styles(
    layout, *, blocks: list[str], first: str, last: str, positions: PositionSplit
) -> dict[str, ParallelStyle]:
    """The styles that split the residual stream by position: entering the first block, gathered leaving the
    last one and entering each group's module, the norms on their positions."""
    plan: dict[str, ParallelStyle] = {}
    for block in blocks:
        for group in layout.groups:
            plan[f"{block}.{group.parent}"] = _Hooks(positions, where=group.parent_input, roles=("gather",))
        plan.update({f"{block}.{norm}": SplitNorm(positions) for norm in layout.norms})
    edges: dict[str, tuple[str, ...]] = {}
    if first in blocks:
        edges[first] = ("first",)
    if last in blocks:
        edges[last] = (*edges.get(last, ()), "last")
    plan.update({name: _Hooks(positions, roles=roles) for name, roles in edges.items()})
    return plan
