"""Optimizer state apart from the parameters: sharded over the replicas (ZeRO-1, ``sharding="optimizer"``)
and/or kept in host memory (``offload="optimizer"``).

The user's optimizer object stays the one the loop holds (its ``step``, ``zero_grad``, ``param_groups`` for
learning-rate schedulers, ``state_dict``); only what its groups hold changes. For each model parameter it
holds a *proxy*: under ZeRO-1 this worker's piece of the parameter (the flat parameter cut into one
contiguous piece per replica, ``torch.chunk``'s sizes: a parameter smaller than the replicas leaves some
with an empty piece), a view of the parameter on the device or its copy in host memory; under offload
alone the whole parameter as this worker holds it (a DTensor shard under FSDP2: the proxy is a DTensor of
the same layout, its local values on the host). Around each ``optimizer.step()``:

- before: each proxy's gradient is its piece of the model parameter's (already reduced) gradient, a view
  on the device or a copy to the host, so ``clip_grad_norm_`` on ``model.parameters()`` acted on it first;
- the user's optimizer updates the proxies;
- after: host proxies are copied back into the parameters; ZeRO-1 pieces are all-gathered (one collective
  per dtype) so every replica holds the whole updated parameter again.

``optimizer.zero_grad()`` clears the model's gradients too. The optimizer's state is then this worker's
alone: each worker's own ``optimizer.state_dict()`` loads back under the same plan only; ``onegpu.save_state``
saves it per parameter (:mod:`onegpu.parallel.state_dict`), for any plan.

Why not ``torch.distributed.optim.ZeroRedundancyOptimizer``: it replaces the user's optimizer object (the
loop and its schedulers hold the old one) and gives each rank whole parameters, so its memory is 1/dp
only when the parameters are many and alike. Pieces of each parameter are 1/dp for any model, and exact
for optimizers that update each element from its own gradient and state (``ELEMENTWISE``); others are
refused under ZeRO-1 (a DTensor parameter keeps its own layout under offload, so those run there).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from onegpu.errors import UsageError
from onegpu.plan import Plan

ELEMENTWISE = tuple(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop", "Rprop", "Adadelta", "ASGD")
)
HOST = torch.device("cpu")
_PLACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its pieces


def placed_pieces(optimizer: torch.optim.Optimizer) -> list[_Piece]:
    """The pieces ``optimizer`` updates in place of the model's parameters (none when it updates them)."""
    return _PLACED.get(optimizer, [])


@dataclass
class _Piece:
    """One parameter's part the optimizer updates: elements ``start:stop`` of its flat local values (ZeRO-1),
    or all of them (``start is None``)."""

    param: nn.Parameter
    proxy: torch.Tensor
    start: int | None = None
    stop: int | None = None
    chunk: int = 0  # ZeRO-1: the elements of each replica's piece (the last ones may hold fewer)
    group: Any = None  # ZeRO-1: the replicas' process group

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the parameter or its gradient) as the proxy sees it: this worker's piece of its values."""
        values = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return values.detach() if self.start is None else values.detach().view(-1)[self.start : self.stop]

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """This worker's piece of ``tensor`` copied to host memory; a whole DTensor (an FSDP2 shard, a
        tensor-parallel piece) stays one of the same layout, so the optimizer sees what it saw before."""
        values = self.local(tensor).to(HOST, copy=True)
        if self.start is None and isinstance(tensor, DTensor):
            return DTensor.from_local(values, tensor.device_mesh, tensor.placements, run_check=False,
                                      shape=tensor.shape, stride=tensor.stride())  # fmt: skip
        return values


def apply_optimizer_state(optimizer: torch.optim.Optimizer, plan: Plan, *, group) -> None:
    """Re-point ``optimizer`` at proxies of its parameters as ``plan`` places the state; ``group`` is the
    data-parallel process group (None: one replica). Does nothing for plans that keep the state with the
    parameters."""
    shard = plan.sharding == "optimizer" and group is not None and dist.get_world_size(group) > 1
    host = plan.offload == "optimizer"
    if not (shard or host):
        return
    if shard and not isinstance(optimizer, ELEMENTWISE):
        raise UsageError(
            f"sharding='optimizer' cuts each parameter's optimizer state into pieces, exact only for optimizers "
            f"that update each element alone (SGD, Adam, AdamW, ...), not {type(optimizer).__name__}: "
            "plan sharding='gradients' instead"
        )
    replicas, rank = (dist.get_world_size(group), dist.get_rank(group)) if shard else (1, 0)
    pieces = []
    for param_group in optimizer.param_groups:
        made = [_piece(p, replicas=replicas, rank=rank, host=host, shard=shard) for p in param_group["params"]]
        param_group["params"] = [piece.proxy for piece in made]
        pieces += made
    for piece in pieces:
        piece.group = group if shard else None
    _PLACED[optimizer] = pieces
    optimizer.register_step_pre_hook(lambda *_: _take_gradients(pieces, host=host))
    optimizer.register_step_post_hook(lambda *_: _return_values(pieces, host=host, group=group if shard else None))
    _clear_model_gradients_too(optimizer, [piece.param for piece in pieces])
    if shard:
        _mark_saved_pieces(optimizer, rank=rank, replicas=replicas)


@torch.no_grad()
def refresh_pieces(optimizer: torch.optim.Optimizer) -> None:
    """The optimizer's pieces given the model's parameters' values again (host copies do not follow a
    parameter loaded in place; views do, and copy onto themselves)."""
    for piece in placed_pieces(optimizer):
        _local(piece.proxy).copy_(piece.local(piece.param))


def _piece(param: nn.Parameter, *, replicas: int, rank: int, host: bool, shard: bool) -> _Piece:
    if shard:
        values = param.to_local() if isinstance(param, DTensor) else param
        if not values.is_contiguous():
            raise UsageError(
                "sharding='optimizer' needs contiguous parameters: call .contiguous() on them before prepare"
            )
        chunk = -(-values.numel() // replicas)
        start = min(rank * chunk, values.numel())
        piece = _Piece(param, param, start, min(start + chunk, values.numel()), chunk)
    else:
        piece = _Piece(param, param)
    piece.proxy = piece.host_copy(param) if host else piece.local(param)
    return piece


def _take_gradients(pieces: list[_Piece], *, host: bool) -> None:
    """Each proxy's gradient: its piece of the model parameter's reduced (and clipped) gradient."""
    for piece in pieces:
        grad = piece.param.grad
        if grad is None:
            piece.proxy.grad = None
            continue
        piece.proxy.grad = piece.host_copy(grad) if host else piece.local(grad)


@torch.no_grad()
def _return_values(pieces: list[_Piece], *, host: bool, group) -> None:
    """The updated values into the model's parameters: host copies back; ZeRO-1 pieces all-gathered."""
    for piece in pieces:
        piece.proxy.grad = None  # the host copy's memory, or a view of the model's gradient, is not kept
    if group is not None:
        by_dtype: dict[torch.dtype, list[_Piece]] = {}
        for piece in pieces:
            by_dtype.setdefault(piece.param.dtype, []).append(piece)
        for same in by_dtype.values():
            _all_gather(same, group=group)
    elif host:
        for piece in pieces:
            piece.local(piece.param).copy_(_local(piece.proxy))


def _all_gather(pieces: list[_Piece], *, group) -> None:
    """Every replica's pieces of ``pieces`` (one dtype), gathered into each parameter whole."""
    device = _local(pieces[0].param).device
    offsets = [0]
    for piece in pieces:
        offsets.append(offsets[-1] + piece.chunk)
    mine = torch.zeros(offsets[-1], dtype=pieces[0].param.dtype, device=device)
    filled = [(o, piece.proxy) for o, piece in zip(offsets, pieces) if piece.proxy.numel()]
    if filled:
        torch._foreach_copy_([mine[o : o + proxy.numel()] for o, proxy in filled], [proxy for _, proxy in filled])
    every = torch.empty(dist.get_world_size(group) * offsets[-1], dtype=mine.dtype, device=device)
    dist.all_gather_single(every, mine, group=group)
    rows = every.view(dist.get_world_size(group), offsets[-1])
    targets = [_local(piece.param).view(-1) for piece in pieces]
    gathered = [rows[:, o : o + p.chunk].reshape(-1)[: t.numel()] for o, p, t in zip(offsets, pieces, targets)]
    torch._foreach_copy_(targets, gathered)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach()


def _clear_model_gradients_too(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """``optimizer.zero_grad()`` also clears the gradients of the model parameters behind its proxies."""
    clear_proxies = optimizer.zero_grad

    def zero_grad(set_to_none: bool = True) -> None:
        clear_proxies(set_to_none)
        for param in params:
            if param.grad is not None and set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.detach_().zero_()

    optimizer.zero_grad = zero_grad


PIECE_KEY = "onegpu_optimizer_piece"


def _mark_saved_pieces(optimizer: torch.optim.Optimizer, *, rank: int, replicas: int) -> None:
    """A ZeRO-1 ``state_dict()`` says whose piece it holds; loading it on another replica (or one saved without
    ZeRO-1) is refused, since its values would silently update the wrong elements."""
    mine = [rank, replicas]

    def mark(_optimizer, state: dict) -> dict:
        state[PIECE_KEY] = mine
        return state

    def check(_optimizer, state: dict) -> dict:
        state = dict(state)
        saved = state.pop(PIECE_KEY, None)
        if saved != mine and state.get("state"):
            whose = f"replica {saved[0]}'s piece of {saved[1]}" if saved else "not a piece (saved without ZeRO-1)"
            raise UsageError(
                f"this optimizer state is {whose}, but this worker holds replica {rank}'s of {replicas} under "
                "sharding='optimizer': each worker loads the optimizer.state_dict() it saved itself, under the same plan"
            )
        return state

    optimizer.register_state_dict_post_hook(mark)
    optimizer.register_load_state_dict_pre_hook(check)
