"""The plan of a model prepared for inference (``prepare(model)`` without an optimizer).

Replicas (``Plan(dp=N)``) when one worker holds the weights, one forward's activations and the key-value cache
within its budget: no communication at all while generating. Else tensor parallelism over the fewest workers that
fit (when the model's layers split), replicated over the rest; else a pipeline over the fewest; else every
replica's weights sharded (FSDP), the least a worker can hold. Inference plans never split the sequence by
position (no sequence parallelism): each decoding step has one token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from onegpu.plan import Plan
from onegpu.planner.memory_model import CPU_RUNTIME_BYTES, GPU_RUNTIME_BYTES, vocabulary_padding
from onegpu.planner.profile import ModelProfile
from onegpu.planner.stages import weight_cuts

GIB = 1024**3
INSPECTED_TOKENS = 64  # a language model prepared for inference without batches is inspected on so many tokens


@dataclass(frozen=True)
class InferenceWork:
    """What is served: the model's profile, the rows one replica runs at once and the tokens its cache holds."""

    profile: ModelProfile
    rows: int = 1
    context: int | None = None  # tokens per row the key-value cache may hold (the model's positions); None: unknown
    tp_degrees: tuple[int, ...] = (1,)  # the tensor-parallel degrees the model's layers split into
    cache_bytes_per_token: int = 0  # keys and values one block caches per token (every head); 0: unknown


def inference_memory(plan: Plan, work: InferenceWork, *, cpu: bool) -> dict[str, int]:
    """Peak bytes of one worker generating under ``plan``: weights, one forward's activations (those a block's
    backward would keep bound its working set; the head's logits), the key-value cache and the runtime."""
    prof, tp = work.profile, plan.tp
    blocks = len(prof.blocks)
    if 1 < plan.pp <= blocks:  # cut as fit_layout cuts an inference pipeline: by parameters
        bounds = [0, *weight_cuts(prof, stages=plan.pp), blocks]
        blocks = max(end - start for start, end in zip(bounds, bounds[1:]))
    block = prof.typical_block if prof.blocks else None
    block_params = block.params if block is not None else 0.0
    weights = (blocks * block_params + prof.rest.params) / tp + vocabulary_padding(prof, tp=tp)
    if plan.sharding == "parameters":  # a shard, and the block gathered now and the next one
        weights = weights / plan.dp + 2 * block_params / tp
    out = {"weights": int(weights * prof.param_bytes)}
    if prof.activations_measured:
        working = (block.activation_bytes / tp if block is not None else 0) + prof.rest.activation_bytes
        out["activations"] = int(working * work.rows)
    kv = _cache_bytes(work, blocks=blocks, tp=tp)
    if kv:
        out["kv_cache"] = kv
    return {**out, "runtime": int(CPU_RUNTIME_BYTES if cpu else GPU_RUNTIME_BYTES)}


def _cache_bytes(work: InferenceWork, *, blocks: int, tp: int) -> int:
    """Keys and values of ``blocks`` blocks for ``work.rows`` rows of ``work.context`` tokens (0 when unknown);
    tensor parallelism splits the heads."""
    return int(work.cache_bytes_per_token * blocks * (work.context or 0) * work.rows / tp)


def choose_inference_plan(*, work: InferenceWork, budget_bytes: int, world_size: int, cpu: bool) -> Plan:
    """Replicas when one worker holds everything, else the fewest tensor-parallel workers that fit, else the
    fewest pipeline stages, else FSDP; the plan's reason says what was counted and why."""
    budget = f"{_size(budget_bytes)} budget"
    replicated = Plan(dp=world_size, reason="inference")
    need, counted = _needs(replicated, work, cpu=cpu)
    if world_size == 1:
        fits = "fits" if need <= budget_bytes else "exceeds"
        return Plan(dp=1, reason=f"inference, one worker: {counted} {fits} its {budget}")
    if need <= budget_bytes:
        return Plan(dp=world_size, reason=f"inference: replicas, {counted} fits the {budget} per worker")
    whole = f"one replica needs {counted}, over the {budget}"
    divisors = [d for d in range(2, world_size + 1) if world_size % d == 0]
    for tp in (d for d in divisors if d in work.tp_degrees):
        plan = Plan(dp=world_size // tp, tp=tp)
        if _needs(plan, work, cpu=cpu)[0] <= budget_bytes:
            return _because(plan, work, cpu=cpu, why=f"{whole}; tensor parallelism over {tp} workers")
    for pp in (d for d in divisors if d <= len(work.profile.blocks)):
        plan = Plan(dp=world_size // pp, pp=pp, microbatches=1, schedule="gpipe")
        if _needs(plan, work, cpu=cpu)[0] <= budget_bytes:
            return _because(plan, work, cpu=cpu, why=f"{whole}; a pipeline of {pp} stages")
    sharded = Plan(dp=world_size, sharding="parameters")
    return _because(sharded, work, cpu=cpu, why=f"{whole}; no split fits: weights sharded over every worker")


def _needs(plan: Plan, work: InferenceWork, *, cpu: bool) -> tuple[int, str]:
    need = inference_memory(plan, work, cpu=cpu)
    total = sum(need.values())
    counted = " + ".join(f"{kind.replace('_', ' ')} {_size(size)}" for kind, size in need.items() if size)
    if "activations" not in need:
        counted += "; activations not counted"
    return total, f"{_size(total)} ({counted})"


def _because(plan: Plan, work: InferenceWork, *, cpu: bool, why: str) -> Plan:
    return replace(plan, reason=f"inference: {why}: {_needs(plan, work, cpu=cpu)[1]} per worker")


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def inference_work(model: Any, description: Any, *, rows: int, world_size: int) -> InferenceWork:
    """What ``model`` (its ``description``, None when it could not be inspected) serves, ``rows`` at a time."""
    profile = ModelProfile.of_parameters(model) if description is None else description.profile
    degrees = (1,) if description is None else description.tensor_parallel_degrees(list(range(1, world_size + 1)))
    return InferenceWork(profile=profile, rows=rows, context=context_tokens(model), tp_degrees=tuple(degrees),
                         cache_bytes_per_token=cache_bytes_per_token(model))  # fmt: skip


def cache_bytes_per_token(model: Any) -> int:
    """Bytes of the keys and values one block of a Hugging Face model caches per token, from its config (0: not
    a model it can tell)."""
    config = getattr(model, "config", None)
    heads = _first_int(config, "num_attention_heads", "n_head")
    hidden = _first_int(config, "hidden_size", "n_embd")
    if not heads or not hidden:
        return 0
    per_head = _first_int(config, "head_dim") or hidden // heads
    kv_heads = _first_int(config, "num_key_value_heads") or heads
    element = next((p.element_size() for p in model.parameters()), 4)
    return 2 * kv_heads * per_head * element


def _first_int(config: Any, *names: str) -> int | None:
    return next((v for v in (getattr(config, n, None) for n in names) if isinstance(v, int)), None)


def context_tokens(model: Any) -> int | None:
    """The tokens a generating model's key-value cache may hold per row (its configured positions), or None."""
    config = getattr(model, "config", None)
    tokens = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return tokens if isinstance(tokens, int) and hasattr(model, "generate") else None


def token_sample(model: Any) -> dict[str, Any] | None:
    """One row of token ids for a Hugging Face language model prepared without a DataLoader (to inspect it for
    inference), or None for other models."""
    import inspect

    import torch

    vocabulary = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocabulary, int) or "input_ids" not in inspect.signature(model.forward).parameters:
        return None
    tokens = min(context_tokens(model) or INSPECTED_TOKENS, INSPECTED_TOKENS)
    return {"input_ids": torch.zeros(1, tokens, dtype=torch.long)}


def profile_cache_bytes_per_token(profile: ModelProfile) -> int:
    """Keys and values one block caches per token, from a profile that knows its heads (a preset's), else 0."""
    if not (profile.hidden_size and profile.num_heads):
        return 0
    kv_heads = profile.num_kv_heads or profile.num_heads
    return 2 * kv_heads * (profile.hidden_size // profile.num_heads) * profile.param_bytes
