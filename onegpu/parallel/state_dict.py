"""A model's and its optimizers' state by the model's own parameter names, under every layout.

Saved states are keyed ``model.<name>`` and ``optim.<i>.<name>.<key>`` (``name`` the user's model's own
fully qualified parameter or buffer name), each value the tensor as this worker holds it: a plain tensor
(one worker, DDP; a pipeline stage's own parameters), a DTensor (FSDP2 shards, tensor-parallel pieces).
torch.distributed.checkpoint reshards those between any two layouts. Three layouts hold a parameter other
than as the model's own tensor, and are adapted here:

- tensor parallelism's fused columns (permuted) and padded vocabulary (:class:`SplitChanges`): saved
  as the model's own tensor (gathered over the tensor-parallel ranks, the change undone), loaded whole and
  changed again, each worker keeping its piece;
- ZeRO-1 (``sharding="optimizer"``): each worker's optimizer state is a flat piece of each parameter;
  saved gathered over the replicas into the parameter's shape, loaded whole and cut into the piece again;
- optimizer offload: the state is in host memory, shaped as the parameter is held; saved and loaded as is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from onegpu.parallel.optimizer_state import placed_pieces
from onegpu.parallel.tensor_parallel import SplitChanges

MODEL, OPTIMIZER = "model.", "optim."


@dataclass
class StateTensors:
    """The tensors one worker writes, or reads into (``after_load`` then moves read values into place)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    after_load: list[Callable[[], None]] = field(default_factory=list)

    def finish(self) -> None:
        for step in self.after_load:
            step()


def split_changes(model: nn.Module) -> SplitChanges:
    pipeline = model.__dict__.get("onegpu_pipeline")
    if pipeline is not None:
        return pipeline.split_changes
    return getattr(model, "onegpu_split_changes", None) or SplitChanges()


def _changed(changes: SplitChanges, name: str) -> bool:
    return name in changes.orders or name in changes.vocabulary


def _own(changes: SplitChanges, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor-parallel piece as the model's own whole tensor (the fused order and padding undone)."""
    return changes.undo({name: tensor.full_tensor()})[name]


def _own_shape(changes: SplitChanges, name: str, tensor: torch.Tensor) -> tuple[int, ...]:
    shape = list(tensor.shape)
    if name in changes.vocabulary:
        shape[0] = changes.vocabulary[name]
    return tuple(shape)


@torch.no_grad()
def _into_piece(changes: SplitChanges, name: str, whole: torch.Tensor, target: torch.Tensor) -> None:
    """The model's own whole tensor ``whole`` changed as splitting changed it, this worker's piece copied into
    ``target`` (a DTensor)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if name in changes.vocabulary:
        rows = target.shape[0] - whole.shape[0]
        whole = torch.cat([whole, whole.new_zeros(rows, *whole.shape[1:])])
    if name in changes.orders:
        order, dim = changes.orders[name]
        whole = whole.index_select(dim, order.to(whole.device))
    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    piece = whole[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
    target.to_local().copy_(piece)


def model_state(model: nn.Module, *, loading: bool = False) -> StateTensors:
    """The model's parameters and persistent buffers, keyed ``model.<name>``: to write, or to read into."""
    changes, out = split_changes(model), StateTensors()
    for name, tensor in model.state_dict().items():
        key = MODEL + name
        if not _changed(changes, name):
            out.tensors[key] = tensor.detach()
        elif not loading:
            out.tensors[key] = _own(changes, name, tensor)
        else:
            whole = torch.empty(_own_shape(changes, name, tensor), dtype=tensor.dtype, device=tensor.to_local().device)
            out.tensors[key] = whole
            out.after_load.append(lambda n=name, w=whole, t=tensor: _into_piece(changes, n, w, t))
    return out


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The global shape of each ``model.<name>`` the model's state holds here (the model's own, unpadded)."""
    changes = split_changes(model)
    return {MODEL + name: _own_shape(changes, name, t) for name, t in model.state_dict().items()}


def optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, tuple[torch.Tensor, object]]:
    """Each parameter the optimizer updates, by the model's name for it: (the tensor the optimizer holds, its
    ZeRO-1 or offload piece, or None)."""
    names = {id(p): n for n, p in model.named_parameters()}
    pieces = {id(piece.proxy): piece for piece in placed_pieces(optimizer)}
    out = {}
    for group in optimizer.param_groups:
        for held in group["params"]:
            piece = pieces.get(id(held))
            param = piece.param if piece is not None else held
            if id(param) in names:
                out[names[id(param)]] = (held, piece)
    return out


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, *, index: int) -> StateTensors:
    """The optimizer's tensors per parameter, keyed ``optim.<index>.<name>.<key>``, each shaped as the model's
    parameter (a 0-dim value, e.g. Adam's ``step``, as it is)."""
    changes, out = split_changes(model), StateTensors()
    for name, (held, piece) in optimizer_params(model, optimizer).items():
        for key, value in optimizer.state.get(held, {}).items():
            if not torch.is_tensor(value):
                continue
            if value.dim() > 0 and piece is not None and piece.start is not None:
                value = _gathered(piece, value)
            if value.dim() > 0 and isinstance(value, DTensor) and _changed(changes, name):
                value = _own(changes, name, value)
            out.tensors[f"{OPTIMIZER}{index}.{name}.{key}"] = value.detach()
    return out


def _gathered(piece, value: torch.Tensor) -> torch.Tensor:
    """A ZeRO-1 piece's optimizer state gathered over the replicas into the parameter's shape (as it is held)."""
    group = piece.group
    padded = value.new_zeros(piece.chunk)
    padded[: value.numel()] = value
    every = value.new_empty(dist.get_world_size(group) * piece.chunk)
    dist.all_gather_single(every, padded, group=group)
    local = piece.param.to_local() if isinstance(piece.param, DTensor) else piece.param
    whole = every[: local.numel()].view(local.shape)
    if isinstance(piece.param, DTensor):
        p = piece.param
        return DTensor.from_local(whole, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return whole


def optimizer_targets(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, index: int, saved: dict[str, tuple[torch.Size, torch.dtype]]
) -> StateTensors:
    """Fresh tensors to read optimizer ``index``'s saved state into (``saved``: each key's shape and dtype in the
    checkpoint); ``after_load`` puts them in the optimizer, replacing its state."""
    changes, out = split_changes(model), StateTensors()
    prefix = f"{OPTIMIZER}{index}."
    params = optimizer_params(model, optimizer)
    keys: dict[str, list[str]] = {}
    for key in saved:
        if key.startswith(prefix):
            name, _, last = key[len(prefix) :].rpartition(".")
            if name in params:
                keys.setdefault(name, []).append(last)
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, state_keys in keys.items():
        held, piece = params[name]
        param = piece.param if piece is not None else held
        state: dict[str, torch.Tensor] = {}
        for state_key in state_keys:
            shape, dtype = saved[f"{prefix}{name}.{state_key}"]
            group = groups[id(held)]
            on_host = not (group.get("capturable") or group.get("fused"))
            target, place = _target(changes, name, param, held, piece, shape=shape, dtype=dtype, host=on_host)
            out.tensors[f"{prefix}{name}.{state_key}"] = target
            state[state_key] = place
        out.after_load.append(lambda h=held, s=state: optimizer.state.__setitem__(h, {k: f() for k, f in s.items()}))
    return out


def _target(changes, name, param, held, piece, *, shape, dtype, host: bool):
    """A tensor to read one saved state value into, and how to make it the optimizer's value afterwards."""
    if len(shape) == 0:
        scalar = torch.zeros((), dtype=dtype, device="cpu" if host else _local(held).device)
        return scalar, lambda: scalar
    own = tuple(shape) == _own_shape(changes, name, param) if isinstance(param, DTensor) else shape == param.shape
    if not own:  # a state of its own shape (not one value per element): held whole by every worker
        whole = torch.zeros(shape, dtype=dtype, device=_local(held).device)
        return whole, lambda: whole
    like = param  # shaped as the parameter is held; _as_held makes it the optimizer's piece
    if isinstance(like, DTensor) and _changed(changes, name):
        whole = torch.zeros(shape, dtype=dtype, device=_local(like).device)
        local = torch.zeros_like(_local(like), dtype=dtype)
        made = DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                  stride=like.stride())  # fmt: skip

        def place():
            _into_piece(changes, name, whole, made)
            return _as_held(made, held, piece)

        return whole, place
    target = torch.zeros_like(like, dtype=dtype)
    return target, lambda: _as_held(target, held, piece)


def _as_held(value: torch.Tensor, held: torch.Tensor, piece) -> torch.Tensor:
    """A state value shaped as the parameter, as the optimizer holds it: its ZeRO-1 piece, or on the host."""
    if piece is None:
        return value
    if piece.start is not None:
        return _local(value).reshape(-1)[piece.start : piece.stop].clone().to(_local(held).device)
    if isinstance(value, DTensor):
        local = value.to_local().to(_local(held).device)
        return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False, shape=value.shape,
                                  stride=value.stride())  # fmt: skip
    return value.to(_local(held).device)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
