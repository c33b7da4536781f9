"""Pipeline parallelism without rewriting or tracing the model: stages are ranges of its repeated blocks.

Each worker runs the model's own forward, with hooks: blocks outside its range pass their
input through untouched, the first block of its range takes the activation received from the
previous stage, and the last block of its range ends the forward and hands its output to the
next stage. Values the model computes around its blocks (embeddings, attention masks, rotary
position embeddings, skip connections) are recomputed by each stage from the micro-batch's own
inputs, so nothing but block activations crosses a cut.

Each worker keeps only the parameters its stages use (the plan says which); the modules around the
blocks whose parameters it does not use (the embedding on later stages, the head on earlier ones)
only produce tensors of the right shape. A parameter several stages use (tied embeddings, a skip
connection's projection) is held by each of them, with one value and its gradients summed across
them.
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.pipelining.microbatch import TensorChunkSpec, _Replicate
from torch.utils._pytree import tree_flatten, tree_map

from onegpu.errors import UsageError
from onegpu.outputs import LOSS, Place, find_loss, loss_place
from onegpu.parallel.blocks import blocks_at

FORWARD_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")  # fmt: skip
SCHEDULE_CLASSES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved": ScheduleInterleaved1F1B,
    "zero-bubble": ScheduleInterleavedZeroBubble,  # backward split in input and weight gradients
}


class _StageDone(Exception):
    def __init__(self, output: torch.Tensor) -> None:
        self.output = output


class Passthrough(nn.Module):
    """A block of another stage: hands its input on."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class ShapeOnly(nn.Module):
    """A module whose parameters this stage does not use, e.g. the embedding on a later stage.

    Its parameters move to the meta device and leave the model; it still returns zeros of the
    shapes and dtypes it would return, for the code around it (mask shapes, dtypes), which does
    not depend on their values.
    """

    def __init__(self, module: nn.Module, *, device: torch.device) -> None:
        super().__init__()
        self.__dict__["original"] = module.to("meta")  # not registered: its parameters are no longer the model's
        self.__dict__["device"] = device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = tree_map(lambda t: t.to("meta") if torch.is_tensor(t) else t, (args, kwargs))
        output = self.original(*args, **kwargs)
        return tree_map(
            lambda t: torch.zeros(t.shape, dtype=t.dtype, device=self.device) if torch.is_tensor(t) else t, output
        )


class BlockLayout:
    """Where a model keeps its repeated blocks (``path``: their container), found before any is replaced."""

    def __init__(self, model: nn.Module, *, path: str) -> None:
        self.model, self.path = model, path
        self.blocks = blocks_at(model, path)
        self.user_class = type(model)

    def hold_only(self, held: set[int]) -> None:
        """Replace the blocks outside ``held`` (other workers' stages) by :class:`Passthrough`, in place."""
        container = self.model.get_submodule(self.path)
        for index in range(len(self.blocks)):
            if index not in held:
                container[index] = Passthrough()

    def view(self, passing: set[int]) -> nn.Module:
        """The model with blocks ``passing`` passed through, run by its own class's forward: a copy of the modules
        on the way to the blocks; every other module, and so every parameter, is shared with the model."""
        root = node = _shallow_copy(self.model)
        root.__class__ = self.user_class  # the model's own forward, even once the model is a pipeline
        for hooks in FORWARD_HOOKS:
            setattr(root, hooks, OrderedDict())  # hooks on the model run once per call, not once per stage
        for name in self.path.split(".") if self.path else []:
            child = _shallow_copy(node._modules[name])
            node._modules[name] = child
            node = child
        for index in passing:
            node._modules[str(index)] = Passthrough()
        return root


def _shallow_copy(module: nn.Module) -> nn.Module:
    copied = copy.copy(module)
    copied._modules = dict(module._modules)  # its own children; parameters and buffers stay shared
    return copied


def keep_only(model: nn.Module, names: set[str], *, device: torch.device) -> None:
    """Replace each module none of whose parameters is in ``names`` by a :class:`ShapeOnly`, in place."""
    kept = {id(p) for name, p in model.named_parameters() if name in names}

    def strip(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            params = list(child.parameters())
            if not params:
                continue
            if any(id(p) in kept for p in params):
                strip(child)
            else:
                setattr(parent, name, ShapeOnly(child, device=device))

    strip(model)


class BlockRangeStage(nn.Module):
    """Blocks ``[start, end)`` of a model, run through the model's own forward.

    Blocks that are not the worker's are :class:`Passthrough` already (:meth:`BlockLayout.hold_only`);
    the worker's other stage's blocks (interleaved schedules) pass through in this stage's view.
    """

    def __init__(self, layout: BlockLayout, *, start: int, end: int, held: set[int], keep_output: bool = False) -> None:
        super().__init__()
        self.model = layout.view(held - set(range(start, end)))
        self.layers = range(start, end)  # its blocks' indices, which are their KV-cache layers' too
        self.first, self.last = start == 0, end == len(layout.blocks)
        self.with_cache = False  # while True: a call carrying a KV cache (generation), see run_model
        self.blocks = layout.blocks[start:end]
        self.loss_place: tuple[Place, int] = (None, 0)  # see last_stage_result
        self.keep_output = keep_output  # the loss is the user's loss_fn of the model's output: hand that over
        self.outputs: list[Any] | None = None  # while a list: the model's whole outputs, kept (evaluation)
        self._received: torch.Tensor | None = None
        self._running = False
        self._hooks: list[Any] = []
        self.connect()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def connect(self) -> None:
        """(Re-)join this stage to its neighbours; call again after wrapping the blocks (checkpointing,
        sharding), so that the received activation is what they see and the handed-over one what they made."""
        self.close()
        if not self.first:
            self._hooks.append(
                self.blocks[0].register_forward_pre_hook(self._take_received, with_kwargs=True, prepend=True)
            )
        if not self.last:
            self._hooks.append(self.blocks[-1].register_forward_hook(self._hand_over))

    def _take_received(self, module, args, kwargs):
        if not self._running:  # recomputation in backward: the block reuses the inputs it saved
            return None
        received = self._received
        if received is None:  # finding the used parameters: a fresh input in the received activation's place
            received = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_()
        if args:
            return (received, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": received}

    def _hand_over(self, module, args, output):
        if self._running:
            raise _StageDone(output[0] if isinstance(output, (tuple, list)) else output)

    def forward(self, *received: torch.Tensor, **inputs: Any):
        if self.with_cache:
            return self.run_model(received[0] if received else None, inputs)
        contiguous_gradients(received)
        if "use_cache" in inspect.signature(self.model.forward).parameters:  # a KV cache: this stage's layers only
            inputs = {**inputs, "use_cache": False}
        output = self.run_model(received[0] if received else None, inputs)
        return output if not self.last else last_stage_output(self, output)

    def run_model(self, received: torch.Tensor | None, inputs: dict[str, Any]) -> Any:
        """The model's forward on ``inputs``, its first block here taking ``received``: the activation to hand
        to the next stage, or on the last stage the model's output."""
        self._received = received
        self._running = True
        try:
            return self.model(**inputs)
        except _StageDone as done:
            return done.output
        finally:
            self._running, self._received = False, None


def last_stage_output(stage: nn.Module, output: Any) -> Any:
    """What the last ``stage`` hands to the schedule's loss function (:func:`last_stage_result`). While the
    stage keeps outputs (evaluation), the model's whole output is kept too, detached, and a model that
    computes no loss (inference without labels) hands over a zero."""
    if stage.outputs is None:
        stage.loss_place, result = last_stage_result(output, keep_output=stage.keep_output)
        return result
    stage.outputs.append(tree_map(lambda t: t.detach() if torch.is_tensor(t) else t, output))
    try:
        stage.loss_place, result = last_stage_result(output, keep_output=stage.keep_output)
    except UsageError:  # no loss to hand over: the outputs are all the user asked for
        stage.loss_place = (LOSS, 0)  # returned as the model's output, without a loss to put in it
        first = next(t for t in tree_flatten(output)[0] if torch.is_tensor(t))
        return torch.zeros((), device=first.device)
    return result


def contiguous_gradients(received: tuple[torch.Tensor, ...]) -> None:
    """Make the gradients of a stage's received values contiguous: they are sent back into buffers laid out
    like them, and a gradient that is a slice (of a concatenation's, say) cannot be received."""
    for value in received:
        if torch.is_tensor(value) and value.requires_grad:
            value.register_hook(torch.Tensor.contiguous)


def last_stage_result(output: Any, *, keep_output: bool) -> tuple[tuple[Place, int], Any]:
    """Where the model's output keeps its loss (:func:`onegpu.outputs.loss_place`, and the output's length if
    it is a sequence), and what the last stage hands to the schedule's loss function: the model's own loss,
    or, when the user gives the loss function, the model's output (the loss is then the output itself)."""
    if keep_output:
        if not torch.is_tensor(output):
            raise UsageError(
                f"prepare(loss_fn=...) under a pipeline plan needs the model to return one tensor, not "
                f"{type(output).__name__}: return the tensor the loss is computed from"
            )
        return (None, 0), output
    found, place = loss_place(output)
    if not found:
        raise UsageError(
            "under a pipeline plan the model must compute its loss: pass labels, return the loss, or give "
            "prepare(..., loss_fn=...) and call model(inputs, target=...)"
        )
    return (place, len(output) if isinstance(place, int) else 0), find_loss(output)


def schedule(
    stages: dict[int, BlockRangeStage],
    *,
    num_stages: int,
    device: torch.device,
    group,
    name: str,
    microbatches: int,
    loss_fn: Callable,
    inputs: dict[str, Any],
):
    """The schedule ``name`` running this worker's ``stages`` (by stage index); ``inputs`` shows the batch's keys."""
    if name not in SCHEDULE_CLASSES:
        raise UsageError(f"schedule {name!r} is not executable yet: use one of {', '.join(SCHEDULE_CLASSES)}")
    workers = dist.get_world_size(group)
    if name != "gpipe" and microbatches < workers:
        raise UsageError(
            f"the {name} schedule needs at least as many micro-batches as pipeline workers ({microbatches} < "
            f"{workers}): use more micro-batches, or the gpipe schedule"
        )
    if len(stages) > 1 and microbatches % workers:
        raise UsageError(
            f"the {name} schedule needs a multiple of {workers} micro-batches (one per pipeline worker), "
            f"not {microbatches}"
        )
    runners = [PipelineStage(stage, index, num_stages, device, group=group) for index, stage in stages.items()]
    spec = {k: TensorChunkSpec(0) if torch.is_tensor(v) and v.dim() > 0 else _Replicate() for k, v in inputs.items()}
    return SCHEDULE_CLASSES[name](
        runners if len(runners) > 1 else runners[0],
        n_microbatches=microbatches,
        loss_fn=loss_fn,
        kwargs_chunk_spec=spec,
        scale_grads=False,
    )


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter's or gradient's own shard; a plain tensor itself."""
    return getattr(tensor, "_local_tensor", tensor)


class SharedParameters:
    """Parameters several pipeline workers hold (tied embeddings, a skip connection's input projection).

    ``holders`` maps each parameter name to the workers (ranks in the pipeline) that hold it; every
    worker passes the same map, since every worker creates every group.
    """

    def __init__(self, model: nn.Module, *, holders: dict[str, list[int]], pp_rank: int, mesh) -> None:
        pipeline_dim = mesh.mesh_dim_names.index("pp")
        ranks = (
            mesh.mesh.movedim(pipeline_dim, -1).reshape(-1, mesh.mesh.shape[pipeline_dim]).tolist()
        )  # [pipeline][rank]
        me = dist.get_rank()
        groups = {}
        for workers in sorted({tuple(w) for w in holders.values() if len(w) > 1}):
            for pipeline in ranks:
                members = [pipeline[w] for w in workers]
                group = dist.new_group(members)
                if me in members:
                    groups[workers] = (group, members[0])
        named = dict(model.named_parameters())
        self.entries = [
            (named[name], *groups[tuple(workers)])
            for name, workers in holders.items()
            if len(workers) > 1 and pp_rank in workers
        ]
        self.foreign = {id(named[name]) for name, workers in holders.items() if pp_rank in workers[1:]}

    def counted_here(self, param: torch.Tensor) -> bool:
        """Whether this worker counts ``param`` in a global norm (the first worker holding it does)."""
        return id(param) not in self.foreign

    def synchronize_values(self) -> None:
        for param, group, first in self.entries:
            dist.broadcast(local_tensor(param.data), src=first, group=group)

    def sum_gradients(self) -> None:
        for param, group, _first in self.entries:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            placements = getattr(param, "placements", None)
            if placements is not None and param.grad.placements != placements:  # e.g. a split embedding's
                param.grad = param.grad.redistribute(param.device_mesh, placements)
            dist.all_reduce(local_tensor(param.grad), group=group)
