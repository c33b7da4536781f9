"""A model run as a pipeline, behind the user's single-device loop.

``loss = model(**batch).loss`` runs the whole schedule (every micro-batch's forward and
backward) and returns the global-batch loss; ``loss.backward()`` only confirms the gradients the
pipeline already made. A loss changed before ``backward`` (a term added, a scale) cannot be
honoured and is reported. Under ``torch.no_grad()`` the schedule runs forward only (evaluation).
``torch.nn.utils.clip_grad_norm_`` on the stage's parameters clips by the norm over all stages.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.utils import clip_grad

from onegpu.errors import UsageError
from onegpu.parallel import pipeline as pp
from onegpu.parallel.blocks import repeated_blocks
from onegpu.parallel.checkpointing import apply_activation_checkpointing
from onegpu.parallel.fsdp import apply_fsdp
from onegpu.parallel.graph_stages import GraphStage, trace
from onegpu.parallel.tensor_parallel import apply_tensor_parallel, unpermuted
from onegpu.parallel.tp_structure import require_tensor_parallel
from onegpu.runtime.global_batch import counted_label_tokens
from onegpu.runtime.materialize import materialize
from onegpu.runtime.optimizer import repoint
from onegpu.runtime.user_loss import TARGET

CHANGED_LOSS = (
    "under a pipeline plan the backward runs inside the pipeline: a loss changed after the forward (a term added, "
    "a scale) cannot be honoured; compute it inside the model, and call backward() on the returned loss as it is"
)


class _PipelineLoss(torch.autograd.Function):
    """The global loss; its backward only checks that nothing was done to it."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, value: float):
        return torch.full((), value, dtype=torch.float32, device=anchor.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if grad.item() != 1.0:
            raise UsageError(CHANGED_LOSS)
        return None, None


class MicroBatchLoss:
    """Each micro-batch's share of the global-batch loss.

    Hugging Face token losses get the global token count as ``num_items_in_batch`` (their loss is
    then already a share); other models' mean losses, and the user's ``loss_fn`` of the model's
    output, are weighted by their number of samples.
    """

    def __init__(self, model: nn.Module, *, data_group=None, loss_fn: Callable | None = None) -> None:
        self.model, self.data_group, self.loss_fn = model, data_group, loss_fn
        self.samples, self.global_samples, self.counted = 1, 1, False

    def inputs(self, inputs: dict[str, Any], target: Any = None) -> tuple[dict[str, Any], torch.Tensor]:
        """The model's inputs for the schedule, and the target it cuts along with them: the user's, for
        ``loss_fn``, or a per-sample one that carries micro-batch sizes.

        Counts are summed over the data-parallel replicas: each pipeline's loss is its share of the
        global batch's.
        """
        if self.loss_fn is not None and target is None:
            raise UsageError("prepare() was given a loss_fn: call the model as model(inputs, target=...)")
        first = next(v for v in inputs.values() if torch.is_tensor(v) and v.dim() > 0)
        self.samples = first.shape[0]
        if target is not None and (not torch.is_tensor(target) or target.dim() == 0 or len(target) != self.samples):
            raise UsageError(f"target must be a tensor with one row per sample ({self.samples}), like the inputs")
        count = counted_label_tokens(self.model, inputs)
        self.counted = count is not None
        totals = torch.tensor([float(count or 0), float(self.samples)], dtype=torch.float64, device=first.device)
        if self.data_group is not None:
            dist.all_reduce(totals, group=self.data_group)
        self.global_samples = int(totals[1])
        if self.counted:
            inputs = {**inputs, "num_items_in_batch": torch.tensor(int(totals[0]), device=first.device)}
        return inputs, torch.ones(self.samples, device=first.device) if target is None else target

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            output = self.loss_fn(output, target)
        return output if self.counted else output * (len(target) / self.global_samples)


class PipelineOutput:
    """What a pipelined model returns: the global-batch loss (the other outputs stay on the last stage)."""

    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss

    def __getitem__(self, key: int | str) -> torch.Tensor:
        if key in (0, "loss"):
            return self.loss
        return self.__getattr__(str(key))

    def __getattr__(self, name: str) -> Any:
        raise UsageError(
            f"under a pipeline plan the model returns only its loss, not {name!r}: "
            "compute what you need from it inside the model, or evaluate with a plan of pp=1"
        )


_pipelines: weakref.WeakSet[PipelinedModel] = weakref.WeakSet()
_LOCAL_TOTAL_NORM = clip_grad._get_total_norm


def _global_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """``clip_grad_norm_``'s total norm, over every stage when the gradients are a pipeline stage's."""
    grads = [tensors] if torch.is_tensor(tensors) else list(tensors)
    for model in list(_pipelines):
        if grads and model.holds_gradients(grads):
            return model.gradient_norm(grads, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)
    return _LOCAL_TOTAL_NORM(grads, norm_type, error_if_nonfinite, foreach)


class PipelinedModel(nn.Module):
    """This worker's pipeline stage, called like the whole model.

    The stage is built at the first batch, which shows the inputs: only then is it known which
    parameters the stage uses; the optimizers are re-pointed at those.
    """

    def __init__(
        self, model: nn.Module, *, plan, worker, cuts: list[int], mesh, optimizers, on_meta: bool, loss_fn=None
    ) -> None:
        super().__init__()
        self.mesh = mesh
        self.pipe_group = mesh["pp"].get_group()
        self.data_group = mesh["dp"].get_group() if plan.dp > 1 else None
        self.tensor_group = mesh["tp"].get_group() if plan.tp > 1 else None
        self.fused_orders: dict = {}  # tensor parallelism's permuted fused layers, undone in checkpoints
        self.stage_index = mesh["pp"].get_local_rank()
        self.last_rank = dist.get_global_rank(self.pipe_group, plan.pp - 1)
        self.loss = MicroBatchLoss(model, data_group=self.data_group, loss_fn=loss_fn)
        self.plan, self.worker, self.cuts = plan, worker, cuts
        self.optimizers, self.on_meta = optimizers, on_meta
        self.model = model
        self.anchor = nn.Parameter(torch.zeros((), device=worker.device))
        self.__dict__["stages"] = {}  # stage index -> pp.BlockRangeStage, not registered: they view self.model
        self.schedule: Any = None
        self.shared: pp.SharedParameters | None = None
        self._in_step = False
        _pipelines.add(self)
        clip_grad._get_total_norm = _global_total_norm

    def _check_inside_step(self, param: torch.Tensor) -> None:
        if not self._in_step:
            raise UsageError(CHANGED_LOSS)

    def parameters(self, recurse: bool = True):
        return self.model.parameters(recurse)

    def named_parameters(self, *args, **kwargs):
        return self.model.named_parameters(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def _build(self, inputs: dict[str, Any]) -> None:
        """This worker's stages: their blocks, the parameters they use (materialized when the model is on
        the meta device), checkpointing and sharding as planned, and the schedule."""
        plan, device = self.plan, self.worker.device
        names = [name for name, _ in self.model.named_parameters()]
        structure = None
        if plan.tp > 1:  # found on the whole model, before it is cut
            structure = require_tensor_parallel(self.model, inputs, tp=plan.tp)
        indices = pp.worker_stages(plan.schedule, pp=plan.pp, rank=self.stage_index)
        hand_output = self.loss.loss_fn is not None  # the last stage hands the model's output to the user's loss_fn
        graph = None
        if repeated_blocks(self.model):
            layout = pp.BlockLayout(self.model)
            bounds = [0, *self.cuts, len(layout.blocks)]
            held = {b for i in indices for b in range(bounds[i], bounds[i + 1])}
            layout.hold_only(held)

            def build_stages() -> dict[int, Any]:
                return {
                    i: pp.BlockRangeStage(
                        layout, start=bounds[i], end=bounds[i + 1], held=held, keep_output=hand_output
                    )
                    for i in indices
                }
        else:  # cut from the traced graph (prepare checked that it traces)
            graph = trace(self.model)
            bounds = [0, *self.cuts, sum(n.op not in ("placeholder", "output") for n in graph.graph.nodes)]

            def build_stages() -> dict[int, Any]:
                return {
                    i: GraphStage(graph, start=bounds[i], end=bounds[i + 1], keep_output=hand_output) for i in indices
                }

        probes = build_stages()
        mine = set().union(*(stage.used_parameters(inputs, device=device) for stage in probes.values()))
        for stage in probes.values():
            stage.close()
        used: list[list[str] | None] = [None] * plan.pp
        dist.all_gather_object(used, sorted(mine), group=self.pipe_group)
        unused = set(names).difference(*used)  # kept by the first worker, so that checkpoints hold them
        keep = [set(u) | (unused if w == 0 else set()) for w, u in enumerate(used)]
        for owner in (self.model, graph) if graph is not None else (self.model,):
            pp.keep_only(owner, keep[self.stage_index], device=device)
        if self.on_meta:
            materialize(self.model, device=device)
            # every replica of a stage, and every tensor-parallel rank, starts from the same values
            for group in (self.data_group, self.tensor_group):
                if group is not None:
                    first = dist.get_global_rank(group, 0)
                    for tensor in (*self.model.parameters(), *self.model.buffers()):
                        dist.broadcast(tensor.data, src=first, group=group)
        if structure is not None:
            kept = lambda name: name is not None and not isinstance(self.model.get_submodule(name), pp.ShapeOnly)
            mine = replace(
                structure,
                blocks=tuple(n for i, n in enumerate(structure.blocks) if i in held),
                embedding=structure.embedding if kept(structure.embedding) else None,
                head=structure.head if kept(structure.head) else None,
            )
            self.fused_orders = apply_tensor_parallel(self.model, mine, mesh=self.mesh["tp"])
        stages = build_stages()  # views of the model as it now is
        for stage in stages.values():
            apply_activation_checkpointing(stage.blocks[: plan.checkpointed_blocks(len(stage.blocks))])
            if plan.sharding != "none":
                apply_fsdp(
                    stage,
                    mesh=self.mesh["dp"],
                    shard_parameters=plan.sharding == "parameters",
                    offload=plan.offload == "parameters",
                    blocks=stage.blocks,
                )
                for module in stage.modules():
                    if isinstance(module, FSDPModule):  # each micro-batch's loss is its share: sum, do not average
                        module.set_gradient_divide_factor(1.0)
                        module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
            stage.connect()
        holders = {name: [w for w in range(plan.pp) if name in keep[w]] for name in names}
        self.shared = pp.SharedParameters(self.model, holders=holders, pp_rank=self.stage_index, mesh=self.mesh)
        if self.on_meta:
            self.shared.synchronize_values()
        self.__dict__["stages"] = stages
        self.schedule = pp.schedule(
            stages,
            num_stages=len(bounds) - 1,
            device=device,
            group=self.pipe_group,
            name=plan.schedule,
            microbatches=plan.microbatches,
            loss_fn=self.loss,
            inputs=inputs,
        )
        for optimizer, groups in self.optimizers:
            repoint(optimizer, self.model, groups)
        for param in self.model.parameters():
            param.register_post_accumulate_grad_hook(self._check_inside_step)

    def forward(self, *args, **kwargs):
        target = kwargs.pop(TARGET, None) if self.loss.loss_fn is not None else None  # else the model's own
        inputs, target = self.loss.inputs(pp.as_keywords(self.model, args, kwargs), target)
        if self.loss.samples % self.plan.microbatches:
            raise UsageError(
                f"a batch of {self.loss.samples} samples cannot be cut into {self.plan.microbatches} equal "
                f"micro-batches: use a batch size that is a multiple of {self.plan.microbatches} (drop_last=True)"
            )
        if self.schedule is None:
            self._build(inputs)
        last = self.stage_index == self.plan.pp - 1
        losses: list[torch.Tensor] = []
        extra = (
            {} if self.stage_index == 0 else {"target": target if last else None, "losses": losses if last else None}
        )
        training = torch.is_grad_enabled()
        if training:
            self._in_step = True
            try:
                self.schedule.step(**inputs, **extra, return_outputs=False)
                self.shared.sum_gradients()
                if self.data_group is not None and self.plan.sharding == "none":  # each replica's is its share
                    for param in self.model.parameters():
                        if param.grad is not None:
                            dist.all_reduce(pp.local_tensor(param.grad), group=self.data_group)
            finally:
                self._in_step = False
        else:
            self.schedule.eval(**inputs, **extra, return_outputs=False)
        total = torch.zeros(2, dtype=torch.float64, device=self.anchor.device)
        if last:
            total[0] = sum(loss.detach().double() for loss in losses)
            total[1] = float(self.stages[max(self.stages)].returned_tensor)
        dist.broadcast(total, src=self.last_rank, group=self.pipe_group)
        if self.data_group is not None:
            dist.all_reduce(total, group=self.data_group)
        loss = _PipelineLoss.apply(self.anchor, float(total[0]))
        return loss if total[1] > 0 else PipelineOutput(loss)

    def holds_gradients(self, grads: list[torch.Tensor]) -> bool:
        mine = {id(p.grad) for p in self.model.parameters() if p.grad is not None}
        return all(id(g) in mine for g in grads)

    def gradient_norm(self, grads: list[torch.Tensor], *, norm_type: float, error_if_nonfinite: bool):
        """The norm of ``grads`` over every stage, a parameter several stages hold counted once."""
        counted_elsewhere = {
            id(p.grad) for p in self.model.parameters() if p.grad is not None and not self.shared.counted_here(p)
        }
        counted = [g for g in grads if id(g) not in counted_elsewhere]
        order = float(norm_type)
        local = _LOCAL_TOTAL_NORM(counted, order) if counted else torch.zeros((), device=self.anchor.device)
        local = local.full_tensor() if hasattr(local, "full_tensor") else local  # sharded: over the replicas too
        if math.isinf(order):
            total = local.double()
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=self.pipe_group)
        else:
            total = local.double() ** order
            dist.all_reduce(total, group=self.pipe_group)
            total = total ** (1.0 / order)
        total = total.to(local.dtype)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(
                f"the total norm of order {norm_type} of the gradients is non-finite, so it cannot be clipped; "
                "pass error_if_nonfinite=False to clip_grad_norm_ to skip this check"
            )
        mesh = getattr(grads[0], "device_mesh", None)
        if mesh is not None:  # sharded gradients are scaled by a replicated norm
            from torch.distributed.tensor import DTensor, Replicate

            total = DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim)
        return total


def pipeline_state_dict(model: PipelinedModel) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0, from the first replica of every stage; empty elsewhere."""
    own = {}
    for name, tensor in model.model.state_dict().items():
        if hasattr(tensor, "full_tensor"):  # a sharded stage: gathered over its replicas, in the same order on each
            tensor = tensor.full_tensor()
        own[name] = tensor.detach().cpu()
    if any(group is not None and dist.get_rank(group) != 0 for group in (model.data_group, model.tensor_group)):
        own = {}  # one copy of each stage
    elif model.fused_orders:
        own = unpermuted(own, model.fused_orders)
    gathered: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    if dist.get_rank() != 0:
        return {}
    state: dict[str, torch.Tensor] = {}
    for part in gathered:
        state.update(part)
    return state
