"""``onegpu.prepare``: the planner chooses a Plan, the runtime executes it.

Rank 0 inspects the model once and chooses the plan (the simple rule, the plan the user gave, or
Advanced Parallelization's search); every worker receives it as JSON and executes it. The plan is the
only thing that passes from the planner to the runtime.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from onegpu.batches import CACHE_NAMES, as_call, as_keywords, first_sample, leading_size, sequence_length
from onegpu.errors import UsageError
from onegpu.launch.process_group import Worker, current_worker, running_backend
from onegpu.plan import Plan
from onegpu.runtime.budget import memory_budget_bytes
from onegpu.runtime.call_slicing import random_state, set_random_state, share_random_state
from onegpu.runtime.data import check_loader, first_samples
from onegpu.runtime.execute import TrainingObjects, execute, sliced_loaders
from onegpu.runtime.job_files import observe_steps, write_plan
from onegpu.runtime.loss_weighting import check_count_items
from onegpu.runtime.model_class import put_in_front
from onegpu.runtime.prepared import remember
from onegpu.runtime.user_loss import check_loss_fn
from onegpu.settings import settings

_pins: dict[str, Any] | None = None
_trials: int | None = None
_described_flops: dict[int, float] = {}  # rank 0: the model FLOPs per token (or sample) its inspection counted


def enable_advanced_parallelization(*, trials: int | None = None, **pins: Any) -> None:
    """Let the planner choose how ``prepare`` splits the work; pins (e.g. ``sharding="parameters"``) constrain it.

    ``trials=k``: ``prepare`` times a few training steps of the planner's ``k`` best plans that fit on the job's
    own workers (on copies of the model and optimizers) and keeps the measured fastest; training itself is
    exactly what it is with that plan given to ``prepare``."""
    from onegpu.planner.pins import parse_pins

    global _pins, _trials
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise UsageError(f"trials={trials!r}: give how many of the best plans to time, a whole number >= 1, e.g. 3")
    parse_pins(**pins)  # a wrong pin fails here, at the line that gave it
    _pins, _trials = dict(pins), trials


def disable_advanced_parallelization() -> None:
    global _pins, _trials
    _pins = _trials = None


def prepare(
    *objects: Any,
    strategy: str | None = None,
    plan: Plan | None = None,
    memory_budget_gb: float | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    count_items: Callable[..., Any] | None = None,
) -> Any:
    """Make a model, its optimizers and data loaders run on all workers; returns them in the same order.

    The model keeps its class and attributes; optimizers are re-pointed at its (possibly
    sharded) parameters; each DataLoader still yields the global batch, of which each worker
    loads its slice. ``strategy`` forces ``"ddp"`` or ``"fsdp"``, ``plan`` a whole Plan; after
    ``onegpu.enable_advanced_parallelization()`` the planner chooses. ``memory_budget_gb`` sets the
    memory one worker may use (default: the device's, or the machine's shared by CPU workers).
    Without an optimizer the model is served: replicas when it fits one worker, else split (tensor parallelism,
    else a pipeline); the log line says why. ``loss_fn(output, target)``, for a model that does not compute its
    loss: ``model(inputs, target=y)`` then returns the loss (the global-batch loss), under every plan.

    The model's loss (a 0-dim tensor, ``output.loss``, ``output["loss"]``, or a 0-dim loss anywhere in a
    returned tuple) is the global batch's on every worker: each slice's loss is weighted by its share of
    the batch's samples, exact for a mean over samples. ``count_items(*args, **kwargs)``, called with the
    model's inputs, returns how many items its loss averages over, for a loss that is a mean over something
    else (tokens not ignored: ``count_items=lambda idx, targets: (targets != -1).sum()``); the share is then
    the slice's items over the global batch's. Hugging Face token losses are counted without it.
    """
    given = TrainingObjects.sort(objects)
    if _pins is not None and _trials is not None and (plan is not None or strategy is not None):
        given_as = "plan=" if plan is not None else "strategy="
        raise UsageError(
            f"trials={_trials} times the planner's plans, but prepare() was given {given_as}: drop it, or call "
            "enable_advanced_parallelization() without trials"
        )
    if loss_fn is not None:
        check_loss_fn(given.model, loss_fn)
    check_count_items(count_items)
    worker = current_worker()
    share_random_state(worker)  # batches drawn in the loop (get_batch) are the same on every worker
    for loader in given.loaders:  # a batch the workers cannot share fails before any heavy work
        check_loader(loader, replicas=worker.world_size if plan is None else plan.dp)
    budget = memory_budget_bytes(
        device=worker.device, local_world_size=worker.local_world_size, budget_gb=memory_budget_gb
    )
    chosen = _shared(
        lambda cluster: _choose(given, cluster, worker=worker, plan=plan, strategy=strategy, budget=budget),
        worker=worker,
        measure=plan is None and strategy is None,  # only a search uses the measured devices
    )
    if _trials is not None and chosen.search is not None:
        chosen = _tried(chosen, given, worker=worker, loss_fn=loss_fn, count_items=count_items)
    if worker.is_main:
        backend = running_backend(worker.device) if dist.is_initialized() else "single process"
        print(
            f"onegpu: {worker.world_size} worker{'s' if worker.world_size > 1 else ''} ({worker.device.type}, "
            f"{backend}) | strategy: {chosen.strategy} | {chosen.reason}",
            file=sys.stderr,
            flush=True,
        )
    if chosen.fitted:
        prepared = execute(chosen, given, worker=worker, loss_fn=loss_fn, count_items=count_items)
        _recorded(chosen, given, worker=worker)
    else:  # no batch to fit the plan's layout to yet: the model's first call shows one
        prepared = sliced_loaders(given, chosen, worker=worker)
        _defer(given, chosen, worker=worker, loss_fn=loss_fn, count_items=count_items)
    remember(prepared, worker=worker)
    return prepared[0] if len(prepared) == 1 else tuple(prepared)


class _Deferred:
    """In front of the model's class from ``prepare`` to its first call, when its inputs show what the plan
    needs to be fitted; the model is then prepared and called."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        build = self.__dict__.pop("onegpu_deferred")
        with torch.random.fork_rng(devices=[]):  # fitting draws no number the loop would have drawn
            build(args, kwargs)
        return self(*args, **kwargs)


def _defer(given: TrainingObjects, plan: Plan, *, worker: Worker, loss_fn, count_items) -> None:
    from onegpu.planner.layout import fit_layout
    from onegpu.runtime.state import load_after_build

    model, user_class = given.model, type(given.model)

    def build(args: tuple, kwargs: dict[str, Any]) -> None:
        model.__class__ = user_class
        del model.onegpu_plan
        keywords = as_keywords(model.forward, args, kwargs)
        keywords = {k: v for k, v in keywords.items() if k not in CACHE_NAMES}  # a KV cache is not written on meta

        def fit(cluster) -> Plan:
            description, unavailable = _describe(model, keywords)
            return fit_layout(plan, description, model=model, sample=keywords, unavailable=unavailable)

        fitted = _shared(fit, worker=worker, measure=False)
        execute(fitted, given, worker=worker, loss_fn=loss_fn, count_items=count_items)
        _recorded(fitted, given, worker=worker)
        load_after_build(model)  # a state load_state found before the model was split

    put_in_front(model, _Deferred, prefix="Deferred")
    model.__dict__["onegpu_deferred"] = build
    model.onegpu_plan = plan


def _recorded(plan: Plan, given: TrainingObjects, *, worker: Worker) -> None:
    """Under ``onegpu run``, rank 0 keeps the executed plan and each step's metrics in the job's record."""
    write_plan(plan, worker=worker)
    flops = _described_flops.pop(id(given.model), None)
    observe_steps(plan, given.model, given.optimizers, worker=worker, flops_per_item=flops)


def _shared(choose: Callable[[Any], Plan], *, worker: Worker, measure: bool = True) -> Plan:
    """The plan rank 0 chooses, on every worker; an error there reaches the others as text. Under
    Advanced Parallelization every worker first takes part in measuring the job's devices. Neither draws a
    number from the streams the training loop draws from (the measurement's random matrices included)."""
    state = random_state(worker.device)
    try:
        return _chosen_on_rank0(choose, worker=worker, measure=measure)
    finally:
        set_random_state(state, worker.device)


def _chosen_on_rank0(choose: Callable[[Any], Plan], *, worker: Worker, measure: bool) -> Plan:
    cluster = _measured_cluster(worker) if measure and _pins is not None else None
    message: list[Any] = [None]
    chosen = failure = None
    if worker.is_main:
        try:
            chosen = choose(cluster)
        except Exception as error:  # every worker raises it, not only rank 0
            failure = error
            kind = UsageError.__name__ if isinstance(error, UsageError) else type(error).__name__
            message[0] = ("error", kind, str(error))
        else:
            message[0] = ("plan", chosen)  # plain frozen data: its predictions and reason travel too
    if worker.world_size > 1:
        dist.broadcast_object_list(message, src=0)
    if failure is not None and not isinstance(failure, UsageError):
        raise failure
    if message[0][0] == "error":
        _, kind, text = message[0]
        if kind == UsageError.__name__:
            raise UsageError(text)
        raise RuntimeError(f"the planner failed on worker 0 ({kind}: {text})")
    return message[0][1]


def _measured_cluster(worker: Worker):
    from onegpu.planner.cluster import measure_job_cluster

    rank = dist.get_rank() if dist.is_initialized() else 0
    return measure_job_cluster(
        rank=rank, world_size=worker.world_size, device=worker.device, devices_per_node=worker.local_world_size
    )


def _choose(given: TrainingObjects, cluster, *, worker: Worker, plan: Plan | None, strategy, budget: int) -> Plan:
    """The plan for this job, fitted to the model (on rank 0): the one given, the inference rule (no optimizer),
    Advanced Parallelization's search, or the simple rule."""
    from onegpu.planner.layout import fit_layout

    model, inference = given.model, not given.optimizers
    if plan is not None and plan.fitted:  # fitted elsewhere (a plan from JSON): nothing to inspect
        return fit_layout(replace(plan, reason=plan.reason or "the plan given to prepare()"), None, model=model)
    slice_ = _worker_slice(given, worker=worker, plan=plan)
    if slice_ is None and inference:
        from onegpu.planner.inference import token_sample

        slice_ = token_sample(model)
    description, unavailable = _describe(model, slice_, precision=_own_precision(model) if inference else "fp32")
    if plan is not None:
        chosen = replace(plan, reason=plan.reason or "the plan given to prepare()")
    elif inference and strategy is None:
        chosen = _inference(given, description, worker=worker, budget=budget, slice_=slice_)
    elif cluster is not None and strategy is None and _trains(model):
        described = _at_precisions(model, slice_, description, cluster=cluster)
        chosen = _searched(given, described, unavailable, cluster=cluster, worker=worker, budget=budget, slice_=slice_)
    else:
        chosen = _simple(
            given, description, worker=worker, strategy=strategy, budget=budget, slice_=slice_, unavailable=unavailable
        )
    if slice_ is None and not chosen.fitted and description is None:
        return chosen  # fitted at the model's first call, whose inputs are the sample it needs
    keywords = None if slice_ is None else as_keywords(model.forward, *as_call(slice_))
    return fit_layout(chosen, description, model=model, sample=keywords, unavailable=unavailable, inference=inference)


def _inference(given: TrainingObjects, description, *, worker: Worker, budget: int, slice_) -> Plan:
    from onegpu.planner.inference import choose_inference_plan, inference_work

    loader = given.loaders[0] if given.loaders else None
    rows = loader.batch_size if loader is not None and loader.batch_size else 1  # generate's calls run whole
    work = inference_work(given.model, description, rows=rows, world_size=worker.world_size)
    return choose_inference_plan(work=work, budget_bytes=budget, world_size=worker.world_size,
                                 cpu=worker.device.type == "cpu")  # fmt: skip


def _worker_slice(given: TrainingObjects, *, worker: Worker, plan: Plan | None) -> Any | None:
    """One worker's slice of the first batch (its replica's, under a given plan)."""
    if not given.loaders or given.loaders[0].batch_size is None:
        return None
    replicas = worker.world_size if plan is None else plan.dp
    return first_samples(given.loaders[0], math.ceil(given.loaders[0].batch_size / replicas))


def _describe(model: nn.Module, slice_: Any | None, *, precision: str = "fp32"):
    """The model's one inspection, on one sample of its batches; or None and why it could not be made."""
    from onegpu.planner.inspection import describe

    if slice_ is None:
        return None, "no DataLoader of a map-style dataset with a batch_size was given to prepare()"
    try:
        description = describe(model, sample=first_sample(slice_), seq_len=sequence_length(slice_), precision=precision)
    except UsageError as error:
        return None, str(error)
    profile = description.profile
    _described_flops[id(model)] = profile.flops_per_sample / max(profile.seq_len, 1)
    return description, ""


def _own_precision(model: nn.Module) -> str:
    """The precision of a model's weights as they are (a model loaded in bf16 is served in bf16)."""
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _trains(model: nn.Module) -> bool:
    """Whether ``model`` has anything to train (a frozen model, or one without parameters, does not)."""
    return any(p.requires_grad for p in model.parameters())


def _simple(given: TrainingObjects, description, *, worker: Worker, strategy, budget: int, slice_, unavailable) -> Plan:
    from onegpu.planner.cost_model import Workload
    from onegpu.planner.profile import ModelProfile, optimizer_state_slots
    from onegpu.planner.simple_rule import choose_plan

    profile = ModelProfile.of_parameters(given.model) if description is None else description.profile
    work = Workload(
        profile=profile,
        global_batch=(1 if slice_ is None else leading_size(slice_)) * worker.world_size,
        optimizer_slots=optimizer_state_slots(given.optimizers[0] if given.optimizers else None),
    )
    return choose_plan(work=work, budget_bytes=budget, world_size=worker.world_size, cpu=worker.device.type == "cpu",
                       strategy=strategy, unmeasured=unavailable)  # fmt: skip


def _at_precisions(model: nn.Module, slice_: Any | None, description, *, cluster) -> dict[str, Any] | None:
    """The model described at each precision the search may choose: fp32, and the pinned precision or, on a
    device with a bf16 peak, bf16 (its working copy and activations are half the size)."""
    from onegpu.planner.pins import parse_pins

    if description is None:
        return None
    pinned = parse_pins(**_pins).precision
    wanted = {pinned} if pinned else {"bf16"} & set(cluster.device.peak_tflops)
    return {"fp32": description, **{p: _describe(model, slice_, precision=p)[0] for p in wanted - {"fp32"}}}


def _searched(
    given: TrainingObjects, described, unavailable: str, *, cluster, worker: Worker, budget: int, slice_
) -> Plan:
    """Advanced Parallelization's choice among the plans the runtime executes, for the job's own devices;
    ``described``: the model's descriptions by precision."""
    from onegpu.planner.pins import parse_pins
    from onegpu.planner.profile import optimizer_state_slots
    from onegpu.planner.search import find_plan

    loader = given.loaders[0] if given.loaders else None
    if loader is None or loader.batch_size is None:
        raise UsageError(
            "advanced parallelization plans from the DataLoader's batches: pass a DataLoader with a "
            "batch_size over a map-style dataset to prepare()"
        )
    if described is None:
        raise UsageError(f"advanced parallelization cannot plan this model: {unavailable}")
    description = described["fp32"]
    if worker.world_size > 1 and description.tensor_parallel_degrees([2]) == [1] and _pins.get("tp") is None:
        print(f"onegpu: no tensor parallelism: {description.why_not_tp(2)}", file=sys.stderr, flush=True)
    cluster = replace(cluster, device=replace(cluster.device, memory_gb=budget / 1e9))
    compiled = measured = None
    if parse_pins(**_pins).compile is not False and settings().measure_compile:
        compiled, eager_s = _block_times(given.model, description, slice_, worker=worker)
        measured = None if eager_s is None else (eager_s, leading_size(slice_))
    chosen = find_plan(
        described,
        global_batch_size=loader.batch_size,
        seq_len=description.profile.seq_len,
        cluster=cluster,
        budget_fraction=1.0,
        optimizer_slots=optimizer_state_slots(given.optimizers[0] if given.optimizers else None),
        compiled_block_time=compiled,
        measured_block=measured if worker.device.type == "cpu" else None,
        **_pins,
    )
    return replace(chosen, reason=_advanced_reason(chosen, budget_bytes=budget))


def _block_times(model: nn.Module, description, slice_, *, worker: Worker) -> tuple[float | None, float | None]:
    """What compiling the model's blocks gains on this worker's device, and an eager block's seconds on the slice
    (cached after the first job), or None."""
    from onegpu.planner.compile_measure import block_times

    if description.blocks is None or slice_ is None:
        return None, None
    return block_times(model, slice_, blocks=description.blocks, device=worker.device)


def _advanced_reason(plan: Plan, *, budget_bytes: int) -> str:
    """The one line prepare() logs about the planner's choice."""
    p, s = plan.predicted, plan.search
    return (
        f"advanced parallelization: {s.candidates} candidates, {s.feasible} fit, {s.seconds:.2f} s | chosen: "
        f"{plan.describe()} | predicted {p.step_time_s:.3f} s/step, {p.tokens_per_s:,.0f} tokens/s, "
        f"{p.memory_per_device_bytes / 1e9:.2f} of {budget_bytes / 1e9:.2f} GB per worker"
    )


def _tried(chosen: Plan, given: TrainingObjects, *, worker: Worker, loss_fn, count_items) -> Plan:
    """The measured fastest of the planner's ``trials`` best plans (timed on every worker), with one log line; a
    plan that fails in its trial (one the runtime cannot run here) is skipped."""
    from onegpu.runtime.trials import TIMED_STEPS, time_plans

    candidates = [chosen, *chosen.alternatives][:_trials]
    trials = time_plans(candidates, given, worker=worker, loss_fn=loss_fn, count_items=count_items)
    fastest = min(trials, key=lambda t: t.seconds)
    if worker.is_main:
        measured = " | ".join(
            f"{t.plan.describe()}: predicted {t.plan.predicted.step_time_s:.3f} s, "
            + (f"failed ({t.failure})" if t.failure else f"measured {t.seconds:.3f} s")
            for t in trials
        )
        print(f"onegpu: trials ({TIMED_STEPS} steps each): {measured}", file=sys.stderr, flush=True)
    if fastest.failure:
        raise RuntimeError(f"every plan failed in its trial; the planner's choice: {fastest.failure}")
    reason = (
        f"measured fastest of {len(trials)} trials: {fastest.plan.describe()}, {fastest.seconds:.3f} s/step "
        f"(predicted {fastest.plan.predicted.step_time_s:.3f} s)"
    )
    others = tuple(t.plan for t in trials if t is not fastest)
    return replace(fastest.plan, alternatives=others, search=chosen.search, reason=reason)
