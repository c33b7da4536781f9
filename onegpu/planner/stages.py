"""How a pipeline's blocks are cut into stages: one rule for the planner's costs and the runtime's cut."""

from __future__ import annotations

import functools
import math

from onegpu.errors import UsageError
from onegpu.plan import INTERLEAVED
from onegpu.planner.profile import ModelProfile


def balanced_cuts(costs: list[float], *, stages: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[int]:
    """First block of stages 1..S-1, so that the costliest stage is as cheap as possible.

    ``costs`` are per-block costs; the first and last stages also carry ``first_extra``
    (embeddings) and ``last_extra`` (head and loss).
    """
    blocks = len(costs)
    if not 1 < stages <= blocks:
        raise UsageError(f"{stages} pipeline stages need a model of at least {stages} blocks; it has {blocks}")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)

    def stage_cost(start: int, end: int) -> float:
        return (
            prefix[end] - prefix[start] + (first_extra if start == 0 else 0.0) + (last_extra if end == blocks else 0.0)
        )

    # best[s][i]: the lowest possible worst-stage cost of cutting blocks[:i] into s stages
    inf = float("inf")
    best = [[inf] * (blocks + 1) for _ in range(stages + 1)]
    choice = [[0] * (blocks + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, blocks + 1):
            for j in range(s - 1, i):
                worst = max(best[s - 1][j], stage_cost(j, i))
                if worst < best[s][i]:
                    best[s][i], choice[s][i] = worst, j
    cuts, end = [], blocks
    for s in range(stages, 1, -1):
        end = choice[s][end]
        cuts.append(end)
    return sorted(cuts)


def flops_cuts(profile: ModelProfile, *, stages: int) -> list[int]:
    """Where the runtime cuts ``profile``'s blocks into ``stages``: balanced by forward+backward FLOPs,
    the head and loss counted on the last stage."""
    costs = tuple(block.fwd_flops + block.bwd_flops for block in profile.blocks)
    return list(_cached_cuts(costs, stages, profile.rest.fwd_flops + profile.rest.bwd_flops))


@functools.lru_cache(maxsize=256)
def _cached_cuts(costs: tuple[float, ...], stages: int, last_extra: float) -> tuple[int, ...]:
    """The search asks for the same few cuts for thousands of candidate plans."""
    return tuple(balanced_cuts(list(costs), stages=stages, last_extra=last_extra))


def worker_stage_blocks(profile: ModelProfile, *, pp: int, schedule: str) -> list[tuple[int, ...]]:
    """The block counts of the stages each of ``pp`` pipeline workers holds (two each under an
    interleaved schedule: stages w and w + pp), cut as the runtime cuts them."""
    blocks = len(profile.blocks)
    stages = pp * (2 if schedule in INTERLEAVED else 1)
    if pp == 1 or not 1 < stages <= blocks:  # one stage, or a layout the search discards anyway
        return [(math.ceil(blocks / stages),) * (stages // pp)] * pp
    bounds = [0, *flops_cuts(profile, stages=stages), blocks]
    sizes = [bounds[i + 1] - bounds[i] for i in range(stages)]
    return [tuple(sizes[w::pp]) for w in range(pp)]
