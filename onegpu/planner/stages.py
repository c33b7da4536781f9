"""How a pipeline's blocks are cut into stages: one rule for the planner's costs and the runtime's cut."""

from __future__ import annotations

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

    # best[s][i]: the lowest possible worst-stage cost of cutting blocks[:i] into s stages (for the i that leave
    # a block to each later stage). Its last stage starts at the smallest j with the lowest
    # max(best[s-1][j], cost of blocks[j:i]). With costs >= 0, best[s-1][j] never falls as j grows and the cost of
    # blocks[j:i] never rises (float rounding is monotonic too): j is walked down from i - 1, and the walk stops
    # once that last stage alone costs more than the best found.
    inf = float("inf")
    best = [[inf] * (blocks + 1) for _ in range(stages + 1)]
    choice = [[0] * (blocks + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        previous, row, chosen = best[s - 1], best[s], choice[s]
        for i in range(s, blocks - stages + s + 1) if s < stages else [blocks]:
            end_extra = last_extra if i == blocks else 0.0
            for j in range(i - 1 if s > 1 else 0, s - 2, -1):  # one stage: it starts at block 0
                last = prefix[i] - prefix[j] + (first_extra if j == 0 else 0.0) + end_extra
                if last > row[i]:
                    break
                worst = max(previous[j], last)
                if worst <= row[i]:
                    row[i], chosen[i] = worst, j
    cuts, end = [], blocks
    for s in range(stages, 1, -1):
        end = choice[s][end]
        cuts.append(end)
    return sorted(cuts)


def flops_cuts(profile: ModelProfile, *, stages: int) -> list[int]:
    """Where the runtime cuts ``profile``'s blocks into ``stages``: balanced by forward+backward FLOPs,
    the head and loss counted on the last stage."""
    key = ("cuts", stages)
    if key not in profile.memo:
        costs = [block.fwd_flops + block.bwd_flops for block in profile.blocks]
        last = profile.rest.fwd_flops + profile.rest.bwd_flops
        profile.memo[key] = tuple(balanced_cuts(costs, stages=stages, last_extra=last))
    return list(profile.memo[key])


def weight_cuts(profile: ModelProfile, *, stages: int) -> list[int]:
    """Where an inference pipeline cuts ``profile``'s blocks: balanced by parameters, the memory each stage holds
    and what a decoding step reads (the embedding counted on the first stage, the head on the last)."""
    outside = profile.rest.params / 2
    costs = [float(block.params) for block in profile.blocks]
    return balanced_cuts(costs, stages=stages, first_extra=outside, last_extra=outside)


def worker_stage_blocks(profile: ModelProfile, *, pp: int, schedule: str) -> list[tuple[int, ...]]:
    """The block counts of the stages each of ``pp`` pipeline workers holds (two each under an
    interleaved schedule: stages w and w + pp), cut as the runtime cuts them."""
    stages = pp * (2 if schedule in INTERLEAVED else 1)
    key = ("workers", pp, stages)
    if key not in profile.memo:
        profile.memo[key] = tuple(_worker_stage_blocks(profile, pp=pp, stages=stages))
    return list(profile.memo[key])


def _worker_stage_blocks(profile: ModelProfile, *, pp: int, stages: int) -> list[tuple[int, ...]]:
    blocks = len(profile.blocks)
    if pp == 1 or not 1 < stages <= blocks:  # one stage, or a layout the search discards anyway
        return [(math.ceil(blocks / stages),) * (stages // pp)] * pp
    bounds = [0, *flops_cuts(profile, stages=stages), blocks]
    sizes = [bounds[i + 1] - bounds[i] for i in range(stages)]
    return [tuple(sizes[w::pp]) for w in range(pp)]
