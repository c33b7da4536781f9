"""What a model costs to train, measured on the meta device: nothing is allocated.

One forward and backward pass of the model on meta tensors, under torch's FlopCounterMode and
a saved-tensors hook, gives per block: parameters, forward and backward FLOPs, and the bytes
autograd keeps for backward. Attention runs as the flash kernel (O(seq) memory), as on GPUs.
Models from a config are measured on their first layers, as many as it takes to meet each kind
of layer once (two for most models), and each layer is counted as the first of its kind, so a
1T-parameter model is analysed as fast as a small one.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from onegpu.errors import UsageError
from onegpu.parallel.blocks import repeated_blocks
from onegpu.planner.layer_kinds import (
    DECODER_CONFIGS,
    layer_count,
    layer_kinds,
    layer_stack,
    per_layer_entries,
    representative_depth,
    shallow_copy,
)
from onegpu.planner.meta_kernels import FLOP_FORMULAS, META_FLASH, GroupedMatmulsInBF16, register_meta_flash
from onegpu.planner.model_presets import PRESETS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_OPS = ("scaled_dot_product", "bmm")  # flash kernels, or the math path's batched matmuls


@dataclass(frozen=True)
class PartProfile:
    """One block (or the rest of the model) for one sample of ``seq_len`` tokens."""

    params: int
    fwd_flops: float
    bwd_flops: float
    activation_bytes: int  # saved for backward, no checkpointing
    boundary_bytes: int  # the block's input: all a checkpointed block keeps
    attention_flops: float = 0.0  # of fwd + bwd, in attention kernels (slower than plain GEMMs)
    ops: int = 0  # operators run in forward + backward (each costs a launch or an eager dispatch)

    def scaled(self, factor: float) -> PartProfile:
        return replace(
            self,
            fwd_flops=self.fwd_flops * factor,
            bwd_flops=self.bwd_flops * factor,
            activation_bytes=int(self.activation_bytes * factor),
            boundary_bytes=int(self.boundary_bytes * factor),
            attention_flops=self.attention_flops * factor,
            ops=self.ops,
        )


@dataclass(frozen=True)
class ModelProfile:
    """A model's training costs, per sample of ``seq_len`` tokens, at one precision."""

    name: str
    seq_len: int
    precision: str
    blocks: tuple[PartProfile, ...]
    rest: PartProfile  # embeddings, final norm, head and loss
    param_bytes: int  # bytes of one parameter as stored
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    vocab_size: int | None = None

    @property
    def params(self) -> int:
        return self.rest.params + sum(b.params for b in self.blocks)

    @property
    def flops_per_sample(self) -> float:
        """Forward + backward FLOPs of one sample, without recomputation."""
        return sum(p.fwd_flops + p.bwd_flops for p in (*self.blocks, self.rest))

    def tp_degrees(self, candidates: list[int]) -> list[int]:
        """Tensor-parallel degrees that divide the heads, KV heads and hidden size (1 when unknown)."""
        if self.num_heads is None or self.hidden_size is None:
            return [1]
        kv = self.num_kv_heads or self.num_heads
        return [t for t in candidates if self.num_heads % t == 0 and kv % t == 0 and self.hidden_size % t == 0]


def load_config(source: str) -> Any:
    """A Hugging Face config from a preset name, a config.json path or a directory holding one."""
    from transformers import AutoConfig

    if source.lower() in PRESETS:
        values = dict(PRESETS[source.lower()])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UsageError(
            f"model {source!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a config.json file or directory"
        )
    try:
        values = json.loads(path.read_text())
        return AutoConfig.for_model(values.pop("model_type"), **values)
    except (json.JSONDecodeError, KeyError, ValueError) as exc:
        raise UsageError(f"{path} is not a Hugging Face config.json ({exc}): give a model's config.json") from None


def analyze(
    model: nn.Module | str, *, seq_len: int, precision: str = "fp32", sample: Any | None = None
) -> ModelProfile:
    """Profile a model given as an nn.Module (on any device), a HF config, a config.json path or a preset name."""
    if precision not in DTYPES:
        raise UsageError(f"precision {precision!r} is not known: use one of {', '.join(DTYPES)}")
    if not isinstance(model, (str, nn.Module)):  # a Hugging Face config object
        return _analyze_config(model, name=getattr(model, "model_type", "model"), seq_len=seq_len, precision=precision)
    if isinstance(model, str):
        return _analyze_config(load_config(model), name=model, seq_len=seq_len, precision=precision)
    if getattr(model, "config", None) is not None and sample is None and hasattr(model.config, "to_dict"):
        return _analyze_config(model.config, name=type(model).__name__, seq_len=seq_len, precision=precision)
    if sample is None:
        raise UsageError("analyzing a plain nn.Module needs a sample batch: pass sample=... (one sample's inputs)")
    return _measure(model, name=type(model).__name__, seq_len=seq_len, precision=precision, sample=sample)


def _analyze_config(config: Any, *, name: str, seq_len: int, precision: str) -> ModelProfile:
    register_meta_flash()
    errors = []
    for attention in (META_FLASH, None):  # None: the model's own, for models that choose their attention
        try:
            profile = _profile_built(config, attention=attention, name=name, seq_len=seq_len, precision=precision)
            break
        except UsageError as error:
            errors.append(error)
    else:
        raise errors[0]
    text = next((getattr(config, n) for n in DECODER_CONFIGS if hasattr(getattr(config, n, None), "to_dict")), config)
    heads = _attribute(text, "num_attention_heads")
    return replace(
        profile,
        hidden_size=_attribute(text, "hidden_size"),
        num_heads=heads,
        num_kv_heads=_attribute(text, "num_key_value_heads") or heads,
        vocab_size=_attribute(text, "vocab_size"),
    )


def _attribute(config: Any, name: str) -> Any:
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - a per-layer attribute of a heterogeneous config has no one value
        return None


def _profile_built(config: Any, *, attention: str | None, name: str, seq_len: int, precision: str) -> ModelProfile:
    """Measure the first layers that hold one layer of each kind, each layer costing what the first of its
    kind does; or, when the config cannot be made shallower, the whole model. Parameters are counted on
    the whole model, each once (layers may share some)."""
    model = _build_on_meta(config, attention=attention, name=name, precision=precision)
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    measure = dict(name=name, seq_len=seq_len, precision=precision, sample={"input_ids": ids, "labels": ids})
    stack = layer_stack(model, layer_count(config) or 0)
    if stack is None:  # no stack of as many layers as the config counts
        return _measure(model, **measure)
    layers = stack[1]
    kinds = layer_kinds(layers, per_layer_entries(config.to_dict()))
    depth = representative_depth(kinds)
    shallow = _shallow_model(config, model, stack, kinds[:depth], attention=attention, precision=precision)
    try:
        profile = _measure(shallow[0], **measure, blocks=shallow[1]) if shallow else None
    except UsageError:  # the shallow copy does not run (its layers loop past its depth, ...)
        profile = None
    if profile is None:
        return _measure(model, **measure, blocks=layers)
    *params, rest = _parameters_per_block(model, layers)
    blocks = tuple(replace(profile.blocks[kinds.index(kind)], params=n) for kind, n in zip(kinds, params))
    return replace(profile, blocks=blocks, rest=replace(profile.rest, params=rest))


def _shallow_model(config: Any, model: nn.Module, stack, kinds: list[tuple], *, attention: str | None, precision: str):
    """The model built from a copy of ``config`` with only its first ``len(kinds)`` layers, and those layers;
    None when that copy is not the model cut short (a config whose other fields follow its depth)."""
    path, layers = stack
    if len(kinds) == len(layers):
        return None
    try:
        small = shallow_copy(config, depth=len(kinds))
        shallow = _build_on_meta(small, attention=attention, name="", precision=precision)
        shallow_layers = list(shallow.get_submodule(path).children())
    except Exception:  # noqa: BLE001 - the config cannot be made shallower: measure every layer
        return None
    entries = {k: v for k, v in per_layer_entries(small.to_dict()).items() if k in per_layer_entries(config.to_dict())}
    same_layers = len(shallow_layers) == len(kinds) and layer_kinds(shallow_layers, entries) == kinds
    same_rest = _parameters_per_block(shallow, shallow_layers)[-1] == _parameters_per_block(model, layers)[-1]
    return (shallow, shallow_layers) if same_layers and same_rest else None


def _parameters_per_block(model: nn.Module, blocks: list[nn.Module]) -> list[int]:
    """Parameters of each block, each counted in the first block that holds it, then those of the rest."""
    seen: set[int] = set()
    counts = []
    for block in [*blocks, model]:
        owned = [p for p in block.parameters() if id(p) not in seen]
        counts.append(sum(p.numel() for p in owned))
        seen.update(id(p) for p in owned)
    return counts


def _build_on_meta(config: Any, *, attention: str | None, name: str, precision: str) -> nn.Module:
    """The causal LM of ``config`` on the meta device, its attention ``attention`` (None: the model's choice)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if attention is not None:
        config._attn_implementation = attention
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=DTYPES[precision])
    except Exception as exc:
        raise UsageError(
            f"{name} cannot be built on the meta device ({type(exc).__name__}: {exc}); "
            f"pin a cluster plan by hand, or plan from a sample batch of the model itself"
        ) from None
    if getattr(model, "loss_type", None) is None:  # what HF falls back to for a causal LM, without its warning
        model.loss_type = "ForCausalLM"
    return model


def _measure(
    model: nn.Module, *, name: str, seq_len: int, precision: str, sample: Any, blocks: list[nn.Module] | None = None
) -> ModelProfile:
    """Run forward+backward on meta, attributing FLOPs and saved bytes to each block (default: the repeated ones)."""
    dtype = DTYPES[precision]
    state = {
        n: torch.empty_like(p, device="meta", dtype=dtype if p.is_floating_point() else p.dtype).requires_grad_(
            p.requires_grad
        )
        for n, p in model.named_parameters()
    }
    state.update({n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()})
    param_storages = {t.untyped_storage()._cdata for t in state.values()}
    blocks = repeated_blocks(model) if blocks is None else blocks
    names = {id(m): n for n, m in model.named_modules()}
    current: list[int | None] = [None]
    saved: dict[int | None, dict[int, int]] = {}
    boundary: dict[int, int] = {}

    kept = []  # every saved storage stays alive while measuring: a freed one's id is not taken by another

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in param_storages:
            saved.setdefault(current[0], {})[storage._cdata] = storage.nbytes()
            kept.append(storage)
        return tensor

    def enter(index: int):
        def hook(module, args, kwargs):
            current[0] = index
            first = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
            boundary[index] = 0 if first is None else first.numel() * first.element_size()

        return hook

    def leave(module, args, output):
        current[0] = None

    ops: dict[int | None, int] = {}

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[current[0]] = ops.get(current[0], 0) + 1
            return func(*args, **(kwargs or {}))

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(index), with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    args, kwargs = _as_call(_to_meta(sample))
    try:
        with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter, GroupedMatmulsInBF16():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), CountOps():
                output = torch.func.functional_call(model, state, args, kwargs)
            fwd = _per_block(counter, names, blocks)
            loss = _loss_of(output)
            loss.backward()
            total = _per_block(counter, names, blocks)
            attention = _per_block(counter, names, blocks, ops=ATTENTION_OPS)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(
            f"{name} cannot run on the meta device ({type(exc).__name__}: {exc}); "
            f"models with data-dependent control flow need a cluster plan pinned by hand"
        ) from None
    finally:
        for handle in handles:
            handle.remove()

    def part(index: int | None, params: int) -> PartProfile:
        f = fwd.get(index, 0.0)
        return PartProfile(
            params=params,
            fwd_flops=f,
            bwd_flops=total.get(index, 0.0) - f,
            activation_bytes=sum(saved.get(index, {}).values()),
            boundary_bytes=boundary.get(index, 0),
            attention_flops=attention.get(index, 0.0),
            ops=3 * ops.get(index, 0),  # backward runs about two operators for each forward one
        )

    *params, rest_params = _parameters_per_block(model, blocks)
    block_parts = [part(i, n) for i, n in enumerate(params)]
    rest = part(None, rest_params)
    return ModelProfile(
        name=name,
        seq_len=seq_len,
        precision=precision,
        blocks=tuple(block_parts),
        rest=rest,
        param_bytes=torch.finfo(DTYPES[precision]).bits // 8,
    )


def _per_block(
    counter: FlopCounterMode, names: dict[int, str], blocks: list[nn.Module], ops: tuple[str, ...] = ()
) -> dict[int | None, float]:
    """FLOPs so far per block (None: outside blocks), of every op or only of ``ops``."""
    counts = counter.get_flop_counts()

    def flops(per_op: dict) -> float:
        return float(sum(v for op, v in per_op.items() if not ops or any(o in str(op) for o in ops)))

    total = flops(counts.get("Global", {}))
    out: dict[int | None, float] = {}
    for index, block in enumerate(blocks):
        key = next((k for k in counts if k.endswith(names[id(block)]) and k != "Global"), None)
        out[index] = flops(counts[key]) if key else 0.0
    out[None] = total - sum(out.values())
    return out


def _loss_of(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None:
        first = output if torch.is_tensor(output) else (output[0] if isinstance(output, (tuple, list)) else None)
        if first is None:
            raise UsageError("the model's output has no tensor to take a loss from: return a loss or a tensor")
        loss = first.float().sum() if first.dim() else first
    return loss


def _to_meta(value: Any) -> Any:
    if torch.is_tensor(value):
        return torch.empty_like(value, device="meta")
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    return value


def _as_call(sample: Any) -> tuple[tuple, dict]:
    if isinstance(sample, dict):
        return (), sample
    if isinstance(sample, (list, tuple)):
        return tuple(sample), {}
    return (sample,), {}
