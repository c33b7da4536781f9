"""Search the plans a cluster allows for the fastest one that fits, and say why the others lost."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from onegpu.errors import UsageError
from onegpu.parallel.batch_norm import no_micro_batches_for
from onegpu.plan import GB, INTERLEAVED, SCHEDULES, Plan, Rejection, SearchStats
from onegpu.planner.analysis import describe_model
from onegpu.planner.cluster import Cluster, load_cluster
from onegpu.planner.confidence import confidence_notes
from onegpu.planner.cost_model import Workload, is_cpu, memory, predict, recompute_time
from onegpu.planner.inspection import ModelDescription
from onegpu.planner.layout import fit_layout
from onegpu.planner.pins import Pins, parse_pins
from onegpu.planner.profile import ModelProfile
from onegpu.planner.stages import worker_stage_blocks
from onegpu.planner.workload import hybrid_shard_group

DEFAULT_BUDGET_FRACTION = 0.9
# a compiled block must be measured this much faster than eager to pay for its compile time (seconds to
# minutes at the start of every job) and for what dynamo adds (recompiles on new shapes)
COMPILE_WORTH = 0.95


class NoPlanFits(UsageError):
    """Not one plan fits the devices' memory; the message says what would."""


@dataclass
class _Tally:
    candidates: int = 0
    feasible: int = 0


def find_plan(
    model: Any,
    *,
    global_batch_size: int,
    seq_len: int,
    cluster: Cluster | str,
    budget_fraction: float = DEFAULT_BUDGET_FRACTION,
    optimizer_slots: int = 2,
    compiled_block_time: float | None = None,
    measured_block: tuple[float, int] | None = None,
    **pins: Any,
) -> Plan:
    """The fastest plan that fits ``cluster`` for ``model`` (a preset, config path or object, a
    :class:`ModelDescription` or a :class:`ModelProfile`), fitted to the model: with its stage cuts and
    tensor-parallel groups.
    ``compiled_block_time``: a compiled block's time over an eager one's, measured on the job's devices;
    without it, blocks are compiled only when the ``compile`` pin asks for it. ``measured_block``: (seconds,
    samples) of one eager block's forward and backward on the job's CPU device (the cost model's CPU times
    are scaled to it)."""
    started = time.perf_counter()
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise UsageError(f"global batch size {global_batch_size!r}: give a whole number >= 1")
    if not 0 < budget_fraction <= 1:
        raise UsageError(f"memory budget fraction {budget_fraction}: give a fraction in (0, 1], e.g. 0.9")
    cluster = load_cluster(cluster) if isinstance(cluster, str) else cluster
    parsed = parse_pins(**pins)
    described = _descriptions(model, seq_len=seq_len, precisions=_precisions(parsed, cluster))
    budget = int(cluster.memory_bytes * budget_fraction)
    tally = _Tally()
    search = _Search(
        described, global_batch_size, optimizer_slots, cluster, parsed, budget, compiled_block_time, measured_block
    )
    scored = list(search.scored(tally))
    feasible = sorted(
        (p for p in scored if p.predicted.memory_per_device_bytes <= budget), key=lambda p: p.predicted.step_time_s
    )
    if not feasible:
        raise search.nothing_fits(scored, budget_fraction)

    def fit(candidate: Plan) -> Plan:  # a bare profile's model has no known structure to fit a plan to
        description = described[candidate.precision]
        return fit_layout(candidate, description) if description.inspected else candidate

    best = feasible[0]
    alternatives = [fit(a) for a in _distinct(feasible[1:], exclude=_family(best), limit=4)]
    rejected = _rejections(scored, best, budget, shown={_family(best), *map(_family, alternatives)})
    stats = SearchStats(
        candidates=tally.candidates, feasible=tally.feasible, seconds=round(time.perf_counter() - started, 4)
    )
    return replace(
        fit(best),
        alternatives=tuple(alternatives),
        rejected=tuple(rejected),
        search=stats,
        reason=f"fastest of {tally.feasible} plans that fit ({tally.candidates} considered)",
        confidence=confidence_notes(best, cluster=cluster, description=described[best.precision]),
    )


def _precisions(pins: Pins, cluster: Cluster) -> list[str]:
    if pins.precision is not None:
        if pins.precision not in cluster.device.peak_tflops and not is_cpu(cluster):  # a CPU is costed at fp32
            raise UsageError(f"{cluster.device.name} has no {pins.precision} peak: choose another mixed_precision")
        return [pins.precision]
    options = [p for p in ("fp32", "bf16") if p in cluster.device.peak_tflops]
    return options or ["fp32"]


def _descriptions(model: Any, *, seq_len: int, precisions: list[str]) -> dict[str, ModelDescription]:
    """The model described at each precision (once per precision; a given description or profile as it is, or
    given descriptions by precision)."""
    if isinstance(model, dict):
        return {p: model[p] for p in precisions if model.get(p) is not None} or {"fp32": model["fp32"]}
    if isinstance(model, ModelDescription):
        return {model.profile.precision: model}
    if isinstance(model, ModelProfile):
        return {model.precision: ModelDescription.of_profile(model)}
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UsageError(f"sequence length {seq_len!r}: give a whole number >= 1")
    if hasattr(getattr(model, "config", None), "to_dict"):  # a Hugging Face module: planned from its config
        model = model.config
    return {p: describe_model(model, seq_len=seq_len, precision=p) for p in precisions}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class _Search:
    """One search: the model at each precision, the job, the cluster, the pins and what the runtime runs."""

    described: dict[str, ModelDescription]
    global_batch: int
    optimizer_slots: int
    cluster: Cluster
    pins: Pins
    budget: int
    compiled_block_time: float | None = None
    measured_block: tuple[float, int] | None = None

    @property
    def compile(self) -> bool:
        """Compiled blocks when pinned so, or when measured worth it on the job's devices: never on a guess."""
        if self.pins.compile is not None:
            return self.pins.compile
        return self.compiled_block_time is not None and self.compiled_block_time <= COMPILE_WORTH

    @property
    def any_description(self) -> ModelDescription:
        return next(iter(self.described.values()))

    def layouts(self) -> Iterator[tuple[int, int, int]]:
        """(dp, tp, pp) that use every device, with tensor parallelism inside a node."""
        pins, described = self.pins, self.any_description
        world, blocks = self.cluster.world_size, max(1, len(described.profile.blocks))
        node = _divisors(self.cluster.devices_per_node)
        tps = described.tensor_parallel_degrees(node)
        if pins.tp is not None:
            if pins.tp not in node:
                raise UsageError(
                    f"tp={pins.tp} must divide the {self.cluster.devices_per_node} devices of a node: "
                    f"tensor parallelism stays inside a node"
                )
            if pins.tp not in tps:
                raise UsageError(f"tp={pins.tp} cannot split {described.name} ({described.why_not_tp(pins.tp)}): "
                                 f"use one of {', '.join(map(str, tps))}")  # fmt: skip
            tps = [pins.tp]
        if described.batch_norm is not None and (pins.pp or 1) * pins.min_pp * (pins.microbatches or 1) > 1:
            raise UsageError(no_micro_batches_for(described.name, described.batch_norm))
        if pins.pp is not None and pins.pp > blocks:
            raise UsageError(f"pp={pins.pp} is more pipeline stages than {described.name}'s {blocks} blocks")
        found = False
        for tp in tps:
            for pp in _divisors(world // tp) if world % tp == 0 else []:
                if pp > blocks or pp < pins.min_pp or (pins.pp and pp != pins.pp) or (pp > 1 and described.batch_norm):
                    continue
                dp = world // (tp * pp)
                if pins.dp is not None and dp != pins.dp:
                    continue
                found = True
                if self.global_batch % dp == 0:
                    yield dp, tp, pp
        if not found:
            raise UsageError(
                f"no layout with dp={pins.dp}, tp={pins.tp}, pp={pins.pp} uses the {world} devices: "
                f"dp * tp * pp must equal {world}"
            )

    def microbatches(self, local_batch: int, pp: int) -> list[int]:
        if self.pins.microbatches is not None:
            return [self.pins.microbatches] if local_batch % self.pins.microbatches == 0 else []
        if pp == 1:
            if self.any_description.batch_norm:  # its statistics need the whole batch
                return [1]
            return [m for m in _divisors(local_batch) if m & (m - 1) == 0]  # powers of two
        options = [m for m in _divisors(local_batch) if m >= pp]
        return [m for m in options if m == options[-1] or (m // pp) & (m // pp - 1) == 0 and m % pp == 0][:8]

    def schedules(self, pp: int) -> list[str]:
        if pp == 1:
            return ["none"] if self.pins.schedule is None else []  # a pinned schedule asks for a pipeline
        return list(SCHEDULES[1:]) if self.pins.schedule is None else [self.pins.schedule]

    def candidates(self, precision: str) -> Iterator[Plan]:
        """Every plan without checkpointing the pins allow and the runtime runs, in the search's order."""
        cluster, blocks = self.cluster, len(self.described[precision].profile.blocks)
        for dp, tp, pp in self.layouts():
            for m in self.microbatches(self.global_batch // dp, pp):
                for schedule in self.schedules(pp):
                    layout = dict(dp=dp, tp=tp, pp=pp, microbatches=m, schedule=schedule, precision=precision)
                    unsharded = {o: Plan(**layout, offload=o, compile=self.compile) for o in self.pins.offloads}
                    for sharding, offload in itertools.product(self.pins.shardings, self.pins.offloads):
                        base = unsharded[offload]  # a hybrid group divides dp: the copy needs no validation
                        group = hybrid_shard_group(base, cluster) if sharding == "hybrid" else None
                        plan = _copy(base, sharding=sharding, shard_group=group)
                        if _sensible(plan, blocks=blocks, cluster=cluster):
                            yield plan

    def scored(self, tally: _Tally) -> Iterator[Plan]:
        """Each candidate with the fewest checkpointed blocks that fit, and its prediction; once one fits,
        plans that only offload more are skipped."""
        if not any(True for _ in self.layouts()):
            raise UsageError(
                f"global batch size {self.global_batch} cannot be split evenly over any data-parallel degree "
                f"the {self.cluster.world_size} devices allow: use a multiple of "
                f"{self.cluster.world_size // max(1, self.pins.tp or 1) // max(1, self.pins.pp or 1)}"
            )
        any_plan, fitted = False, set()
        for precision, described in self.described.items():
            work = Workload(
                profile=described.profile,
                global_batch=self.global_batch,
                optimizer_slots=self.optimizer_slots,
                sequence_parallel=described.sequence_parallel,
                compiled_block_time=self.compiled_block_time,
                measured_block=self.measured_block,
            )
            for base in self.candidates(precision):
                any_plan = True
                key = _family(base)[:-2] + (base.dp, base.microbatches, base.precision)
                if key in fitted:
                    continue  # a smaller offload of this plan already fits
                found = _with_checkpointing(base, work, self.cluster, self.pins, self.budget, tally)
                yield found
                if found.predicted.memory_per_device_bytes <= self.budget:
                    fitted.add(key)
        if not any_plan and self.pins.microbatches is not None:
            raise UsageError(
                f"microbatches={self.pins.microbatches} does not divide the per-replica batch: choose a divisor "
                f"of global batch / dp"
            )

    def fits(self, **changes: Any) -> bool:
        """Whether any plan fits with another global batch or cluster."""
        try:
            return any(
                p.predicted.memory_per_device_bytes <= self.budget for p in replace(self, **changes).scored(_Tally())
            )
        except UsageError:
            return False

    def nothing_fits(self, scored: list[Plan], fraction: float) -> NoPlanFits:
        cluster = self.cluster
        smallest = min((p.predicted.memory_per_device_bytes for p in scored), default=0)
        advice = []
        for factor in (2, 4, 8, 16, 32, 64, 128):
            bigger = cluster.with_overrides(nodes=cluster.nodes * factor)
            if self.fits(cluster=bigger):
                advice.append(f"{bigger.world_size} devices ({bigger.nodes} nodes) would fit")
                break
        batch = self.global_batch // 2
        while batch >= 1:
            if self.fits(global_batch=batch):
                advice.append(f"a global batch of {batch} would fit on these {cluster.world_size} devices")
                break
            batch //= 2
        return NoPlanFits(
            f"no plan fits: the smallest needs {smallest / GB:.1f} GB per device, and each {cluster.device.name} "
            f"offers {self.budget / GB:.2f} GB ({fraction:.0%} of {cluster.memory_bytes / GB:.2f} GB)"
            + ("; " + "; ".join(advice) if advice else "; no larger cluster or smaller batch tried fits either")
        )


def _sensible(plan: Plan, *, blocks: int, cluster: Cluster) -> bool:
    """Plans worth costing: interleaving needs two blocks per stage and micro-batches per worker (and stages
    unsharded: FSDP2 cannot shard two stages of one worker), 1F1B's steady state a micro-batch per stage;
    sharding needs replicas, hybrid sharding replicas across nodes, and offloaded parameters sharded ones."""
    dp, pp, m, schedule, sharding = plan.dp, plan.pp, plan.microbatches, plan.schedule, plan.sharding
    if schedule in INTERLEAVED and (blocks < 2 * pp or m % pp or sharding in ("gradients", "parameters", "hybrid")):
        return False
    if schedule not in ("none", "gpipe") and m < pp:
        return False
    if dp == 1 and sharding != "none":
        return False
    if sharding == "hybrid" and (cluster.nodes == 1 or plan.shard_group >= dp):
        return False
    return not (plan.offload == "parameters" and sharding not in ("parameters", "hybrid"))


def _with_checkpointing(base: Plan, work: Workload, cluster: Cluster, pins: Pins, budget: int, tally: _Tally) -> Plan:
    """The plan with the fewest checkpointed blocks that fits (more only costs recomputation), or, when that
    recomputes blocks, selective recomputation if it fits and is faster."""
    blocks = max(max(stages) for stages in worker_stage_blocks(work.profile, pp=base.pp, schedule=base.schedule))
    sizes: dict[Plan, dict[str, int]] = {}

    def with_blocks(count: int) -> Plan:
        return _copy(base, activation_checkpointing="none" if count == 0 else "full" if count >= blocks else count)

    def size(candidate: Plan) -> int:
        tally.candidates += 1
        sizes[candidate] = memory(candidate, work, cluster)
        return sum(sizes[candidate].values())

    if pins.activation_checkpointing is not None:
        chosen = replace(base, activation_checkpointing=pins.activation_checkpointing)
        if isinstance(pins.activation_checkpointing, int) and pins.activation_checkpointing > blocks:
            raise UsageError(
                f"activation_checkpointing={pins.activation_checkpointing} blocks: a stage has only "
                f"{blocks}; use full or at most {blocks}"
            )
        size(chosen)
    else:
        low, high = 0, blocks  # memory falls as more blocks recompute: find the fewest that fit
        if size(with_blocks(0)) <= budget:
            high = 0
        elif size(with_blocks(blocks)) > budget:
            low = high = blocks
        while low < high:
            middle = (low + high) // 2
            if size(with_blocks(middle)) <= budget:
                high = middle
            else:
                low = middle + 1
        chosen = with_blocks(high)
    scored = _copy(chosen, predicted=predict(chosen, work, cluster, memory_breakdown=sizes[chosen]))
    selective = _copy(base, activation_checkpointing="selective")
    unpinned = pins.activation_checkpointing is None
    if unpinned and chosen.checkpointed_blocks(blocks) and _selective_measured(work) and size(selective) <= budget:
        faster = recompute_time(selective, work, cluster) < recompute_time(chosen, work, cluster)
        if faster or scored.predicted.memory_per_device_bytes > budget:  # else recomputing a few blocks is faster
            scored = _copy(selective, predicted=predict(selective, work, cluster, memory_breakdown=sizes[selective]))
    if scored.compile and scored.activation_checkpointing != "none" and pins.compile is None:
        # a compiled block that recomputes can fail torch's check that recomputation saw the forward's tensors
        # (CheckpointError "different metadata", pytorch/pytorch#166926): a block that recomputes runs eager
        eager = _copy(scored, compile=False)
        size(eager)
        scored = _copy(eager, predicted=predict(eager, work, cluster, memory_breakdown=sizes[eager]))
    if scored.predicted.memory_per_device_bytes <= budget:
        tally.feasible += 1
    return scored


def _selective_measured(work: Workload) -> bool:
    return bool(work.profile.blocks) and work.profile.typical_block.selective_activation_bytes is not None


def _copy(plan: Plan, **changes: Any) -> Plan:
    """``replace(plan, **changes)`` without validating again: for changes the search knows valid, in its
    hot loop (a checkpointed block count, a prediction)."""
    copied = object.__new__(Plan)
    copied.__dict__.update(plan.__dict__, **changes)
    return copied


def _family(p: Plan) -> tuple:
    return (p.tp, p.pp, p.sharding, p.schedule, p.offload, p.precision)


def _distinct(plans: list[Plan], *, exclude: tuple, limit: int) -> list[Plan]:
    seen, out = {exclude}, []
    for p in plans:
        if _family(p) not in seen:
            seen.add(_family(p))
            out.append(p)
        if len(out) == limit:
            break
    return out


def _rejections(scored: list[Plan], best: Plan, budget: int, *, shown: set) -> list[Rejection]:
    """The best plan of each other family, with the reason it lost."""
    by_family: dict[tuple, Plan] = {}
    for p in scored:
        key = _family(p)
        if key in shown:
            continue
        current = by_family.get(key)
        if current is None or _rank(p, budget) < _rank(current, budget):
            by_family[key] = p
    out = []
    for p in sorted(by_family.values(), key=lambda p: _rank(p, budget))[:6]:
        need = p.predicted.memory_per_device_bytes
        if need > budget:
            why = f"out of memory: needs {need / GB:.1f} GB, {(need - budget) / GB:.1f} GB over the budget"
        else:
            why = f"{p.predicted.step_time_s / best.predicted.step_time_s - 1:.0%} slower"
        out.append(Rejection(plan=p, why=why))
    return out


def _rank(p: Plan, budget: int) -> tuple:
    over = max(0, p.predicted.memory_per_device_bytes - budget)
    return (over > 0, over, p.predicted.step_time_s)
