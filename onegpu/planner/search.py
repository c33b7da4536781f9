"""Search the plans a cluster allows for the fastest one that fits, and say why the others lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from onegpu.errors import UsageError
from onegpu.planner.analysis import ModelProfile, analyze
from onegpu.planner.cluster import Cluster, load_cluster
from onegpu.planner.cost_model import Workload, memory, predict
from onegpu.planner.pins import Pins, parse_pins
from onegpu.planner.plan import GB, INTERLEAVED, OFFLOADS, SCHEDULES, SHARDINGS, Plan, Rejection, SearchStats
from onegpu.planner.stages import worker_stage_blocks

DEFAULT_BUDGET_FRACTION = 0.9


class NoPlanFits(UsageError):
    """Not one plan fits the devices' memory; the message says what would."""


@dataclass(frozen=True)
class Capabilities:
    """What a runtime can execute; the search offers nothing else. ``None`` leaves a dimension open."""

    tp: bool = True
    pp: bool = True
    shardings: tuple[str, ...] = SHARDINGS
    offloads: tuple[str, ...] = OFFLOADS
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    accumulation: bool = True
    schedules: tuple[str, ...] = ("gpipe", "1f1b", "interleaved", "zero-bubble")
    interleaving_with_sharding: bool = True  # an interleaved schedule over sharded stages
    sequence_parallel: bool = True  # the model's norms and residuals can be split by position under tp


EVERYTHING = Capabilities()


@dataclass
class _Tally:
    candidates: int = 0
    feasible: int = 0


def plan(
    model: Any,
    *,
    global_batch_size: int,
    seq_len: int,
    cluster: Cluster | str,
    budget_fraction: float = DEFAULT_BUDGET_FRACTION,
    optimizer_slots: int = 2,
    capabilities: Capabilities = EVERYTHING,
    **pins: Any,
) -> Plan:
    """The fastest plan that fits ``cluster`` for ``model`` (an nn.Module, config path, preset or profile)."""
    started = time.perf_counter()
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise UsageError(f"global batch size {global_batch_size!r}: give a whole number >= 1")
    if not 0 < budget_fraction <= 1:
        raise UsageError(f"memory budget fraction {budget_fraction}: give a fraction in (0, 1], e.g. 0.9")
    cluster = load_cluster(cluster) if isinstance(cluster, str) else cluster
    parsed = parse_pins(**pins)
    profiles = _profiles(model, seq_len=seq_len, precisions=_precisions(parsed, cluster, capabilities))
    budget = int(cluster.memory_bytes * budget_fraction)
    tally = _Tally()
    scored = list(_score(profiles, global_batch_size, optimizer_slots, cluster, parsed, capabilities, budget, tally))
    feasible = sorted(
        (p for p in scored if p.predicted.memory_per_device_bytes <= budget), key=lambda p: p.predicted.step_time_s
    )
    if not feasible:
        raise _nothing_fits(
            scored, profiles, global_batch_size, optimizer_slots, cluster, parsed, capabilities, budget, budget_fraction
        )
    best = feasible[0]
    alternatives = _distinct(feasible[1:], exclude=_family(best), limit=4)
    rejected = _rejections(scored, best, budget, shown={_family(best), *map(_family, alternatives)})
    stats = SearchStats(
        candidates=tally.candidates, feasible=tally.feasible, seconds=round(time.perf_counter() - started, 4)
    )
    return replace(
        best,
        alternatives=tuple(alternatives),
        rejected=tuple(rejected),
        search=stats,
        reason=f"fastest of {tally.feasible} plans that fit ({tally.candidates} considered)",
    )


def _precisions(pins: Pins, cluster: Cluster, capabilities: Capabilities) -> list[str]:
    if pins.precision is not None:
        if pins.precision not in capabilities.precisions:
            raise UsageError(f"mixed precision {pins.precision} is not executable here yet: use mixed_precision='off'")
        if pins.precision not in cluster.device.peak_tflops:
            raise UsageError(f"{cluster.device.name} has no {pins.precision} peak: choose another mixed_precision")
        return [pins.precision]
    options = [p for p in ("fp32", "bf16") if p in capabilities.precisions and p in cluster.device.peak_tflops]
    return options or ["fp32"]


def _profiles(model: Any, *, seq_len: int, precisions: list[str]) -> dict[str, ModelProfile]:
    if isinstance(model, ModelProfile):
        return {model.precision: model}
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UsageError(f"sequence length {seq_len!r}: give a whole number >= 1")
    return {p: analyze(model, seq_len=seq_len, precision=p) for p in precisions}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layouts(
    profile: ModelProfile, cluster: Cluster, pins: Pins, caps: Capabilities, global_batch: int
) -> Iterator[tuple[int, int, int]]:
    """(dp, tp, pp) that use every device, with tensor parallelism inside a node."""
    world, blocks = cluster.world_size, max(1, len(profile.blocks))
    tps = profile.tp_degrees(_divisors(cluster.devices_per_node)) if caps.tp else [1]
    if pins.tp is not None:
        if pins.tp not in _divisors(cluster.devices_per_node):
            raise UsageError(
                f"tp={pins.tp} must divide the {cluster.devices_per_node} devices of a node: "
                f"tensor parallelism stays inside a node"
            )
        if pins.tp not in tps:
            heads = f"{profile.num_heads} attention heads" if profile.num_heads else "no known head count"
            raise UsageError(
                f"tp={pins.tp} cannot split {profile.name} ({heads}, {profile.num_kv_heads} KV heads): "
                f"use one of {', '.join(map(str, tps))}"
            )
        tps = [pins.tp]
    if pins.pp is not None and pins.pp > blocks:
        raise UsageError(f"pp={pins.pp} is more pipeline stages than {profile.name}'s {blocks} blocks")
    found = False
    for tp in tps:
        for pp in _divisors(world // tp) if world % tp == 0 else []:
            if pp > blocks or pp < pins.min_pp or (pp > 1 and not caps.pp) or (pins.pp and pp != pins.pp):
                continue
            dp = world // (tp * pp)
            if pins.dp is not None and dp != pins.dp:
                continue
            found = True
            if global_batch % dp == 0:
                yield dp, tp, pp
    if not found:
        raise UsageError(
            f"no layout with dp={pins.dp}, tp={pins.tp}, pp={pins.pp} uses the {world} devices: "
            f"dp * tp * pp must equal {world}"
        )


def _microbatches(local_batch: int, pp: int, pins: Pins, caps: Capabilities) -> list[int]:
    if pins.microbatches is not None:
        return [pins.microbatches] if local_batch % pins.microbatches == 0 else []
    if pp == 1:
        if not caps.accumulation:
            return [1]
        return [m for m in _divisors(local_batch) if m & (m - 1) == 0]  # powers of two
    options = [m for m in _divisors(local_batch) if m >= pp]
    return [m for m in options if m == options[-1] or (m // pp) & (m // pp - 1) == 0 and m % pp == 0][:8]


def _score(profiles, global_batch, optimizer_slots, cluster, pins, caps, budget, tally) -> Iterator[Plan]:
    any_profile = next(iter(profiles.values()))
    layouts = list(_layouts(any_profile, cluster, pins, caps, global_batch))
    if not layouts:
        raise UsageError(
            f"global batch size {global_batch} cannot be split evenly over any data-parallel degree "
            f"the {cluster.world_size} devices allow: use a multiple of "
            f"{cluster.world_size // max(1, pins.tp or 1) // max(1, pins.pp or 1)}"
        )
    shardings = [s for s in pins.shardings if s in caps.shardings]
    offloads = [o for o in pins.offloads if o in caps.offloads]
    if not shardings or not offloads:
        raise UsageError(
            f"sharding {pins.shardings} / offload {pins.offloads} is not executable here yet: "
            f"choose from sharding {', '.join(caps.shardings)} and offload {', '.join(caps.offloads)}"
        )
    any_microbatches = False
    for precision, profile in profiles.items():
        work = Workload(
            profile=profile,
            global_batch=global_batch,
            optimizer_slots=optimizer_slots,
            sequence_parallel=caps.sequence_parallel,
        )
        for dp, tp, pp in layouts:
            for m in _microbatches(global_batch // dp, pp, pins, caps):
                any_microbatches = True
                schedules = ["none"] if pp == 1 else [s for s in SCHEDULES[1:] if s in caps.schedules]
                if pins.schedule is not None:
                    schedules = [pins.schedule] if pp > 1 and pins.schedule in caps.schedules else []
                for schedule in schedules:
                    if schedule in INTERLEAVED and (len(profile.blocks) < 2 * pp or m % pp):
                        continue
                    if schedule != "gpipe" and m < pp:  # 1F1B's steady state needs a micro-batch per stage
                        continue
                    for sharding in shardings:
                        if dp == 1 and sharding != "none":
                            continue
                        if schedule in INTERLEAVED and sharding != "none" and not caps.interleaving_with_sharding:
                            continue
                        if sharding == "hybrid" and (cluster.nodes == 1 or dp <= cluster.devices_per_node // (tp * pp)):
                            continue
                        for offload in offloads:
                            if offload == "parameters" and sharding not in ("parameters", "hybrid"):
                                continue
                            base = Plan(
                                dp=dp,
                                tp=tp,
                                pp=pp,
                                microbatches=m,
                                schedule=schedule,
                                sharding=sharding,
                                offload=offload,
                                precision=precision,
                            )
                            found = _with_checkpointing(base, work, cluster, pins, budget, tally)
                            yield found
                            if found.predicted.memory_per_device_bytes <= budget:
                                break  # offloading more is only slower
    if not any_microbatches:
        raise UsageError(
            f"microbatches={pins.microbatches} does not divide the per-replica batch: choose a divisor "
            f"of global batch / dp"
        )


def _with_checkpointing(base: Plan, work: Workload, cluster: Cluster, pins: Pins, budget: int, tally: _Tally) -> Plan:
    """The plan with the fewest checkpointed blocks that fits (more only costs recomputation)."""
    blocks = max(max(stages) for stages in worker_stage_blocks(work.profile, pp=base.pp, schedule=base.schedule))

    def with_blocks(count: int) -> Plan:
        value: str | int = "none" if count == 0 else "full" if count >= blocks else count
        return replace(base, activation_checkpointing=value)

    def size(candidate: Plan) -> int:
        tally.candidates += 1
        return sum(memory(candidate, work, cluster).values())

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
    scored = replace(chosen, predicted=predict(chosen, work, cluster))
    if scored.predicted.memory_per_device_bytes <= budget:
        tally.feasible += 1
    return scored


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


def _nothing_fits(scored, profiles, global_batch, optimizer_slots, cluster, pins, caps, budget, fraction) -> NoPlanFits:
    smallest = min((p.predicted.memory_per_device_bytes for p in scored), default=0)
    advice = []
    for factor in (2, 4, 8, 16, 32, 64, 128):
        bigger = cluster.with_overrides(nodes=cluster.nodes * factor)
        if _fits(profiles, global_batch, optimizer_slots, bigger, pins, caps, budget):
            advice.append(f"{bigger.world_size} devices ({bigger.nodes} nodes) would fit")
            break
    batch = global_batch // 2
    while batch >= 1:
        if _fits(profiles, batch, optimizer_slots, cluster, pins, caps, budget):
            advice.append(f"a global batch of {batch} would fit on these {cluster.world_size} devices")
            break
        batch //= 2
    return NoPlanFits(
        f"no plan fits: the smallest needs {smallest / GB:.1f} GB per device, and each {cluster.device.name} "
        f"offers {budget / GB:.2f} GB ({fraction:.0%} of {cluster.memory_bytes / GB:.2f} GB)"
        + ("; " + "; ".join(advice) if advice else "; no larger cluster or smaller batch tried fits either")
    )


def _fits(profiles, global_batch, optimizer_slots, cluster, pins, caps, budget) -> bool:
    try:
        scored = _score(profiles, global_batch, optimizer_slots, cluster, pins, caps, budget, _Tally())
        return any(p.predicted.memory_per_device_bytes <= budget for p in scored)
    except UsageError:
        return False
