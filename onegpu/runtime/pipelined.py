"""A model run as a pipeline, behind the user's single-device loop.

The model object stays the user's: its class becomes a subclass of the user's class (as FSDP2 does
for sharded modules), so ``isinstance`` checks, attributes and methods are unchanged. Calling it,
``loss = model(**batch).loss``, runs the whole schedule (every micro-batch's forward and backward)
and returns the global-batch loss; ``loss.backward()`` only confirms the gradients the pipeline
already made, scaled as the loop scaled the loss (``(loss / k).backward()`` for gradient
accumulation, :mod:`onegpu.runtime.call_gradients`). A term added to the loss cannot be honoured and is
reported. Under ``torch.no_grad()`` the schedule runs forward only (evaluation) and the model returns
its whole output on every worker (:mod:`onegpu.runtime.pipeline_outputs`), labels or not; calls carrying
a KV cache (``generate``) run the stages one after another (:mod:`onegpu.runtime.pipelined_generation`).
``clip_grad_norm_`` on the stage's parameters clips by the norm over all stages (:mod:`onegpu.runtime.stage_gradients`).

Everything is built at ``prepare`` from the plan: the blocks (or traced-graph nodes) of this
worker's stages, the parameters they use, tensor parallelism, checkpointing and data parallelism;
only the schedule waits for the first batch, which shows the inputs' names.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from onegpu.batches import as_keywords
from onegpu.errors import UsageError
from onegpu.launch.process_group import Worker
from onegpu.outputs import find_loss, replace_loss
from onegpu.parallel import pipeline as pp
from onegpu.parallel.checkpointing import checkpoint_blocks
from onegpu.parallel.compile import apply_compile
from onegpu.parallel.data_parallel import apply_data_parallel
from onegpu.parallel.graph_stages import GraphStage, computing_nodes, trace
from onegpu.parallel.layouts import data_parallel_mesh
from onegpu.parallel.materialize import materialize
from onegpu.parallel.mixed_precision import as_fp32, is_mixed
from onegpu.parallel.tensor_parallel import SplitChanges, apply_tensor_parallel
from onegpu.plan import Plan
from onegpu.runtime.call_gradients import CHANGED_LOSS, CallGradients, ConfirmedLoss
from onegpu.runtime.call_slicing import CallSlicer
from onegpu.runtime.loss_weighting import MicroBatchLoss
from onegpu.runtime.model_class import put_in_front
from onegpu.runtime.pipeline_outputs import broadcast_output, joined
from onegpu.runtime.pipelined_generation import StagesInSequence
from onegpu.runtime.stage_gradients import mark_gradients
from onegpu.runtime.timeline import TimelineRecorder
from onegpu.runtime.user_loss import TARGET
from onegpu.runtime.watchdog import Watchdog

BARE, KEYED = -1, -2  # where a model's output keeps its loss, besides a position in a tuple


class PipelineOutput:
    """What a pipelined model returns in training: the global-batch loss (the other outputs stay on the last
    stage; under ``torch.no_grad()`` the model's whole output is returned), in the loss's place: ``.loss``,
    ``["loss"]`` and, for a model returning a tuple, its position (``logits, loss = model(x, y)`` unpacks)."""

    def __init__(self, loss: torch.Tensor, *, position: int = 0, length: int = 0) -> None:
        self.loss, self.position, self.length = loss, position, length

    def __getitem__(self, key: int | str) -> Any:
        if key in (self.position, "loss"):
            return self.loss
        if isinstance(key, int) and -self.length <= key < 0:
            return self[key + self.length]
        return self.__getattr__(str(key))

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return iter([self.loss if i == self.position else _NotReturned() for i in range(self.length)])

    def __getattr__(self, name: str) -> Any:
        raise UsageError(
            f"under a pipeline plan the model returns only its loss in training, not {name!r}: compute what "
            "you need from it inside the model, or under torch.no_grad(), where it returns its whole output"
        )


class _NotReturned:
    """An output other than the loss, unpacked from a pipelined model's tuple: it stays on the last stage."""

    def __getattr__(self, name: str) -> Any:
        raise UsageError(
            "under a pipeline plan the model returns only its loss in training, not its other outputs: compute what "
            "you need from them inside the model, or under torch.no_grad(), where it returns its whole output"
        )


class PipelinedModule:
    """Put in front of the user's model class: calling the model runs its pipeline."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["onegpu_pipeline"].run(args, kwargs)


def parallelize_pipeline(
    model: nn.Module,
    plan: Plan,
    *,
    mesh,
    worker: Worker,
    on_meta: bool,
    loss_fn: Callable | None,
    watchdog: Watchdog | None,
    count_items: Callable | None = None,
) -> None:
    """Make ``model`` this worker's stages of the pipeline ``plan`` describes, in place."""
    pipeline = Pipeline(
        model,
        plan,
        mesh=mesh,
        worker=worker,
        on_meta=on_meta,
        loss_fn=loss_fn,
        watchdog=watchdog,
        count_items=count_items,
    )
    put_in_front(model, PipelinedModule, prefix="Pipelined")
    model.__dict__["onegpu_pipeline"] = pipeline


class Pipeline:
    """This worker's stages of one model, and the schedule that runs them."""

    def __init__(
        self, model: nn.Module, plan: Plan, *, mesh, worker: Worker, on_meta, loss_fn, watchdog, count_items=None
    ) -> None:
        self.model, self.plan, self.mesh, self.watchdog = model, plan, mesh, watchdog
        self.user_forward = model.forward  # its signature names the positional inputs
        self.pipe_group = mesh["pp"].get_group()
        self.data_group = mesh["dp"].get_group() if plan.dp > 1 else None
        self.tensor_group = mesh["tp"].get_group() if plan.tp > 1 else None
        self.stage_index = mesh["pp"].get_local_rank()
        self.last_rank = dist.get_global_rank(self.pipe_group, plan.pp - 1)
        self.loss = MicroBatchLoss(
            model, group=self.data_group, loss_fn=loss_fn, count_items=count_items, microbatches=plan.microbatches
        )
        self.slicer = None  # a global batch built in the loop: this replica's rows of it
        if plan.dp > 1:
            replica = mesh["dp"].get_local_rank()
            self.slicer = CallSlicer(replica=replica, replicas=plan.dp, group=self.data_group, worker=worker)
        self.anchor = torch.zeros((), device=worker.device, requires_grad=True)  # the returned loss's autograd root
        self.device, self.in_step = worker.device, False
        self.schedules: dict[tuple[str, ...], Any] = {}  # by the inputs' names, built at the first such batch
        self.split_changes = SplitChanges()  # what tensor parallelism changed, undone in checkpoints
        names = [name for name, _ in model.named_parameters()]
        self.indices = plan.worker_stages(self.stage_index)
        build = self._graph_stages if plan.stages.traced else self._block_stages
        make_stages, holders = build(names, keep_output=loss_fn is not None)
        if on_meta:
            self._materialize()
        if plan.tp > 1:
            self._split_tensors()
        self.stages = make_stages()  # views of the model as it now is
        self._parallelize_stages()
        self.in_sequence = StagesInSequence.of(self)  # calls carrying a KV cache: stages one after another
        self.shared = pp.SharedParameters(model, holders=holders, pp_rank=self.stage_index, mesh=mesh)
        if on_meta:
            self.shared.synchronize_values()
        for param in model.parameters():
            param.register_post_accumulate_grad_hook(self._check_inside_step)
        self.call_gradients = CallGradients(list(model.parameters()), mark=self._mark_gradients)
        self.timeline = TimelineRecorder.for_worker(
            rank=dist.get_rank(), plan=plan, stages=self.indices, device=self.device
        )

    # --- building ------------------------------------------------------------------------------------
    def _block_stages(self, names: list[str], *, keep_output: bool):
        plan, path = self.plan, self.plan.blocks
        layout = pp.BlockLayout(self.model, path=path)
        count = len(layout.blocks)
        bounds = [0, *plan.stages.cuts, count]
        stage_of_block = {b: s for s in range(len(bounds) - 1) for b in range(bounds[s], bounds[s + 1])}
        held = {b for i in self.indices for b in range(bounds[i], bounds[i + 1])}
        outside = dict(plan.stages.outside)
        workers_of = {}
        for name in names:
            block = _block_index(name, path)
            stages = (stage_of_block[block],) if block is not None else outside.get(name, ())
            workers_of[name] = sorted({s % plan.pp for s in stages}) or [0]  # unused: the first worker keeps it
        self.blocks_held = [f"{path}.{b}" for b in sorted(held)]
        self.first_block, self.last_block, self.blocks = f"{path}.0", f"{path}.{count - 1}", count
        layout.hold_only(held)
        pp.keep_only(self.model, {n for n in names if self.stage_index in workers_of[n]}, device=self.device)

        def make_stages() -> dict[int, Any]:
            return {
                i: pp.BlockRangeStage(layout, start=bounds[i], end=bounds[i + 1], held=held, keep_output=keep_output)
                for i in self.indices
            }

        return make_stages, workers_of

    def _graph_stages(self, names: list[str], *, keep_output: bool):
        graph = trace(self.model)
        bounds = [0, *self.plan.stages.cuts, len(computing_nodes(graph))]
        stages = [GraphStage(graph, start=bounds[i], end=bounds[i + 1]) for i in range(len(bounds) - 1)]
        used = [stage.used_parameters() for stage in stages]
        workers_of = {n: sorted({s % self.plan.pp for s, u in enumerate(used) if n in u}) or [0] for n in names}
        mine = {n for n in names if self.stage_index in workers_of[n]}
        for owner in (self.model, graph):
            pp.keep_only(owner, mine, device=self.device)
        self.blocks_held, self.first_block, self.last_block = [], "", ""

        def make_stages() -> dict[int, Any]:
            return {
                i: GraphStage(graph, start=bounds[i], end=bounds[i + 1], keep_output=keep_output) for i in self.indices
            }

        return make_stages, workers_of

    def _materialize(self) -> None:
        """A meta-built model gets storage for this worker's parameters only; every replica of a stage, and
        every tensor-parallel rank, starts from the same values."""
        materialize(self.model, device=self.device)
        for group in (self.data_group, self.tensor_group):
            if group is not None:
                first = dist.get_global_rank(group, 0)
                for tensor in (*self.model.parameters(), *self.model.buffers()):
                    dist.broadcast(tensor.data, src=first, group=group)

    def _split_tensors(self) -> None:
        self.split_changes = apply_tensor_parallel(
            self.model,
            self.plan.tensor_parallel,
            mesh=self.mesh["tp"],
            blocks=self.blocks_held,
            first=self.first_block,
            last=self.last_block,
        )

    def _parallelize_stages(self) -> None:
        """Checkpointing, compile and data parallelism per stage (a module two of its stages share: the first's)."""
        managed: set[nn.Parameter] = set()
        for index, stage in self.stages.items():  # under mixed precision, at degree 1 the units carry the policy
            checkpoint_blocks(stage.blocks, self.plan)
            if self.plan.compile:
                apply_compile(stage.blocks)
            if self.plan.dp > 1 or is_mixed(self.plan.precision):  # the last stage hands its loss on in fp32
                apply_data_parallel(stage, mesh=data_parallel_mesh(self.mesh, self.plan), plan=self.plan, blocks=stage.blocks, ignored=managed,
                                    outputs_in_fp32=index == self.plan.pipeline_stages - 1)  # fmt: skip
            managed |= set(stage.parameters())
            stage.connect()

    def _check_inside_step(self, param: torch.Tensor) -> None:
        if not self.in_step:
            raise UsageError(CHANGED_LOSS)

    # --- running -------------------------------------------------------------------------------------
    def run(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        inputs = as_keywords(self.user_forward, args, kwargs)
        if self.in_sequence.carries_cache(inputs):
            return self.in_sequence.run(inputs)  # the whole batch on every replica
        if self.slicer is None:
            return self._run(args, kwargs)
        if self.watchdog is not None:  # the fingerprint's all-gather waits for every replica
            self.watchdog.enter("forward")
        try:
            args, kwargs, bounds = self.slicer.slice_call(args, kwargs)
        except UsageError:
            if self.watchdog is not None:
                self.watchdog.leave()
            raise
        self.slicer.fork_random(self.model)
        try:
            output = self._run(args, kwargs)
        finally:
            self.slicer.join_random()
        return output if bounds is None or torch.is_grad_enabled() else self.slicer.gather_output(output, bounds)

    def _run(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        call = (args, dict(kwargs))  # as given, for count_items
        target = kwargs.pop(TARGET, None) if self.loss.loss_fn is not None else None  # else the model's own
        inputs, target = self.loss.inputs(as_keywords(self.user_forward, args, kwargs), target, call=call)
        whole = self.in_sequence.uncut(as_keywords(self.user_forward, *call), loss=self.loss)
        if whole is not None:  # under no_grad, a batch the schedule cannot cut (here or on another replica) runs whole
            return whole
        if self.loss.samples % self.plan.microbatches:
            raise UsageError(
                f"a batch of {self.loss.samples} samples cannot be cut into {self.plan.microbatches} equal "
                f"micro-batches: use a batch size that is a multiple of {self.plan.microbatches} (drop_last=True)"
            )
        schedule = self._schedule_for(inputs)
        last = self.stage_index == self.plan.pp - 1
        losses: list[torch.Tensor] = []
        extra = (
            {} if self.stage_index == 0 else {"target": target if last else None, "losses": losses if last else None}
        )
        evaluating, last_stage = not torch.is_grad_enabled(), self.stages[max(self.stages)]
        if self.watchdog is not None:
            self.watchdog.enter("pipeline schedule")
        try:
            last_stage.outputs = [] if evaluating and last else None
            self._step(schedule, inputs, extra)
            loss, (place, length) = self._global_loss(losses if last else None)
            if evaluating and place != BARE:
                return self._evaluation_output(last_stage.outputs, loss)
        finally:
            last_stage.outputs = None
            if self.watchdog is not None:
                self.watchdog.leave()
        if place == BARE:
            return loss
        return PipelineOutput(loss, position=max(place, 0), length=length)

    def _evaluation_output(self, outputs: list[Any] | None, loss: torch.Tensor) -> Any:
        """The model's output for this replica's rows, the loss the global batch's, on every pipeline worker."""
        if outputs is not None:  # the micro-batches' (a schedule's first step runs one forward before, for shapes)
            outputs = as_fp32(outputs[-self.plan.microbatches :], self.plan.precision)  # as from every layout
        output = broadcast_output(
            joined(outputs) if outputs is not None else None,
            src=self.last_rank,
            group=self.pipe_group,
            device=self.device,
        )
        return replace_loss(output, loss) if find_loss(output) is not None else output

    def _schedule_for(self, inputs: dict[str, Any]) -> Any:
        """The schedule for batches with these inputs' names (evaluation may leave the labels out)."""
        names = tuple(inputs)
        if names not in self.schedules:
            self.schedules[names] = pp.schedule(
                self.stages,
                num_stages=self.plan.pipeline_stages,
                device=self.device,
                group=self.pipe_group,
                name=self.plan.schedule,
                microbatches=self.plan.microbatches,
                loss_fn=self.loss,
                inputs=inputs,
            )
        return self.schedules[names]

    def _step(self, schedule: Any, inputs: dict[str, Any], extra: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():
            schedule.eval(**inputs, **extra, return_outputs=False)
            return
        self.in_step = True
        self.call_gradients.start()
        try:
            with self.timeline.training_call(schedule) if self.timeline else nullcontext():
                schedule.step(**inputs, **extra, return_outputs=False)
            self.shared.sum_gradients()
        finally:
            self.in_step = False
            self.call_gradients.finish()
        self._mark_gradients()

    def _mark_gradients(self) -> None:
        mark_gradients(list(self.model.parameters()), group=self.pipe_group, counted_here=self.shared.counted_here)

    def _global_loss(self, losses: list[torch.Tensor] | None) -> tuple[torch.Tensor, tuple[int, int]]:
        """The global-batch loss on every worker, and where the model's output keeps it: ``BARE`` (it is the
        loss), ``KEYED`` (``.loss``, ``["loss"]``) or a position in a tuple, with the tuple's length."""
        total = torch.zeros(3, dtype=torch.float64, device=self.device)
        if losses is not None:
            place, length = self.stages[max(self.stages)].loss_place
            total[0] = sum(loss.detach().double() for loss in losses)
            total[1:] = torch.tensor([BARE if place is None else KEYED if place == "loss" else place, length])
        dist.broadcast(total, src=self.last_rank, group=self.pipe_group)
        value = total[:1].clone()
        if self.data_group is not None:
            dist.all_reduce(value, group=self.data_group)
        return ConfirmedLoss.apply(self.anchor, float(value), self.call_gradients), (int(total[1]), int(total[2]))


def _block_index(name: str, path: str) -> int | None:
    """The block a parameter named ``name`` belongs to (``model.layers.3.mlp.up.weight`` -> 3), if any."""
    prefix = f"{path}."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix) :].split(".", 1)[0])


def pipeline_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0, from the first replica of every stage; empty elsewhere."""
    pipeline = model.__dict__["onegpu_pipeline"]
    own = {}
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):  # a sharded stage: gathered over its replicas, in the same order on each
            tensor = tensor.full_tensor()
        own[name] = tensor.detach().cpu()
    if any(group is not None and dist.get_rank(group) != 0 for group in (pipeline.data_group, pipeline.tensor_group)):
        own = {}  # one copy of each stage
    else:
        own = pipeline.split_changes.undo(own)
    gathered: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    if dist.get_rank() != 0:
        return {}
    state: dict[str, torch.Tensor] = {}
    for part in gathered:
        state.update(part)
    return state
