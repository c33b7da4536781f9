"""A plan fitted to a model: the layout fields the runtime builds it from (stage cuts and what each stage
holds, tensor-parallel groups), worked out from the model's description."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from onegpu.errors import UsageError
from onegpu.parallel.batch_norm import refuse_micro_batches
from onegpu.plan import Plan, StageLayout
from onegpu.planner.inspection import ModelDescription
from onegpu.planner.stages import flops_cuts, weight_cuts


def fit_layout(
    plan: Plan,
    description: ModelDescription | None,
    *,
    model: nn.Module | None = None,
    sample: Any = None,
    unavailable: str = "",
    inference: bool = False,
) -> Plan:
    """``plan`` with this model's layout. A pipeline of repeated blocks is cut by the blocks' FLOPs (the head
    and loss on the last stage), for ``inference`` by their parameters; a model without them is traced and cut between the nodes of its graph, for
    which ``model`` and ``sample`` (one worker's batch, by keyword) are needed. Without a description (the
    model could not be inspected, ``unavailable`` says why) only plans of data parallelism fit. An ``inference``
    plan splits no sequence by position (each decoding step has one token)."""
    if (plan.pp > 1 or plan.microbatches > 1) and model is not None:
        refuse_micro_batches(model)
    if plan.fitted and description is None:  # fitted already: only the blocks' path may be missing
        return plan if plan.blocks is not None else replace(plan, blocks=_blocks_path(model))
    blocks = description.blocks if description is not None else _blocks_path(model)
    if description is None and (plan.tp > 1 or (plan.pp > 1 and blocks is not None)):
        raise UsageError(f"this plan needs the model's structure, which onegpu could not inspect: {unavailable}")
    stages = None
    if plan.pp > 1 and blocks is not None:
        cuts = weight_cuts if inference else flops_cuts
        stages = description.stage_layout(cuts(description.profile, stages=plan.pipeline_stages))
    elif plan.pp > 1:
        stages = _traced_stages(plan, model=model, sample=sample)
    tensor_parallel = description.tensor_parallel_layout(plan.tp) if plan.tp > 1 else None
    if tensor_parallel is not None and inference:
        tensor_parallel = replace(tensor_parallel, sequence_parallel=False, norms=())
    return replace(plan, blocks=blocks, stages=stages, tensor_parallel=tensor_parallel)


def _blocks_path(model: nn.Module | None) -> str | None:
    from onegpu.parallel.blocks import block_container, repeated_blocks

    blocks = repeated_blocks(model) if model is not None else []
    return block_container(model, blocks) if blocks else None


def _traced_stages(plan: Plan, *, model: nn.Module | None, sample: Any) -> StageLayout:
    from onegpu.parallel.graph_stages import trace
    from onegpu.planner.graph_cuts import graph_cuts

    if model is None or sample is None:
        raise UsageError("a model without repeated blocks is cut from a batch: pass its DataLoader to prepare()")
    graph = trace(model)
    return StageLayout(cuts=tuple(graph_cuts(graph, sample, stages=plan.pipeline_stages)), traced=True)
