"""A model to plan for, from wherever it comes: an nn.Module (with a sample of its inputs), a Hugging Face
config object, a config.json file or directory, or a preset name. Each is inspected once
(:func:`onegpu.planner.inspection.describe`) into a :class:`ModelDescription`.

Models from a config are measured on their first layers, as many as it takes to meet each kind of
layer once (two for most models), and each layer is counted as the first of its kind, so a
1T-parameter model is analysed as fast as a small one.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onegpu.errors import UsageError
from onegpu.planner.inspection import ModelDescription, describe, parameters_per_block
from onegpu.planner.layer_kinds import (
    DECODER_CONFIGS,
    layer_count,
    layer_kinds,
    layer_stack,
    per_layer_entries,
    representative_depth,
    shallow_copy,
)
from onegpu.planner.meta_kernels import META_FLASH, register_meta_flash
from onegpu.planner.model_presets import PRESETS
from onegpu.planner.preset_profiles import preset_description
from onegpu.planner.profile import DTYPES, ModelProfile


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


def describe_model(model: Any, *, seq_len: int, precision: str = "fp32", sample: Any | None = None) -> ModelDescription:
    """The description of a model given as an nn.Module (on any device, with ``sample``, one sample's inputs),
    a Hugging Face config object, a config.json path or a preset name."""
    if precision not in DTYPES:
        raise UsageError(f"precision {precision!r} is not known: use one of {', '.join(DTYPES)}")
    if isinstance(model, nn.Module):
        if sample is None:
            raise UsageError("analyzing an nn.Module needs a sample batch: pass sample=... (one sample's inputs)")
        return describe(model, sample=sample, seq_len=seq_len, precision=precision)
    if isinstance(model, str):  # a preset is read from the inspection's stored output, when it has one
        stored = preset_description(model, seq_len=seq_len, precision=precision)
        return stored or describe_live(model, seq_len=seq_len, precision=precision)
    return _describe_config(model, name=getattr(model, "model_type", "model"), seq_len=seq_len, precision=precision)


def describe_live(model: str, *, seq_len: int, precision: str) -> ModelDescription:
    """A preset or config.json path inspected now, never read from the presets' stored descriptions."""
    return _describe_config(load_config(model), name=model, seq_len=seq_len, precision=precision)


def analyze(model: Any, *, seq_len: int, precision: str = "fp32", sample: Any | None = None) -> ModelProfile:
    """What a model costs to train (:func:`describe_model`'s profile); an nn.Module with a Hugging Face config
    and no sample is planned from its config."""
    if isinstance(model, nn.Module) and sample is None and hasattr(getattr(model, "config", None), "to_dict"):
        model = model.config
    return describe_model(model, seq_len=seq_len, precision=precision, sample=sample).profile


def _describe_config(config: Any, *, name: str, seq_len: int, precision: str) -> ModelDescription:
    register_meta_flash()
    errors = []
    for attention in (META_FLASH, None):  # None: the model's own, for models that choose their attention
        try:
            found = _described_built(config, attention=attention, name=name, seq_len=seq_len, precision=precision)
            break
        except UsageError as error:
            errors.append(error)
    else:
        raise errors[0]
    text = next((getattr(config, n) for n in DECODER_CONFIGS if hasattr(getattr(config, n, None), "to_dict")), config)
    heads = _attribute(text, "num_attention_heads")
    profile = replace(
        found.profile,
        hidden_size=_attribute(text, "hidden_size"),
        num_heads=heads,
        num_kv_heads=_attribute(text, "num_key_value_heads") or heads,
        vocab_size=_attribute(text, "vocab_size"),
    )
    return replace(found, profile=profile)


def _attribute(config: Any, name: str) -> Any:
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - a per-layer attribute of a heterogeneous config has no one value
        return None


def _described_built(config: Any, *, attention: str | None, name: str, seq_len: int, precision: str):
    """Measure the first layers that hold one layer of each kind, each layer costing what the first of its
    kind does; or, when the config cannot be made shallower, the whole model. Parameters are counted on
    the whole model, each once (layers may share some)."""
    model = _build_on_meta(config, attention=attention, name=name, precision=precision)
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    measure = dict(name=name, seq_len=seq_len, precision=precision, sample={"input_ids": ids, "labels": ids})
    stack = layer_stack(model, layer_count(config) or 0)
    if stack is None:  # no stack of as many layers as the config counts
        return describe(model, **measure)
    layers = stack[1]
    kinds = layer_kinds(layers, per_layer_entries(config.to_dict()))
    depth = representative_depth(kinds)
    shallow = _shallow_model(config, model, stack, kinds[:depth], attention=attention, precision=precision)
    try:
        found = describe(shallow[0], **measure, blocks=shallow[1]) if shallow else None
    except UsageError:  # the shallow copy does not run (its layers loop past its depth, ...)
        found = None
    if found is None:
        return describe(model, **measure, blocks=layers)
    *params, rest = parameters_per_block(model, layers)
    profile = found.profile
    blocks = tuple(replace(profile.blocks[kinds.index(kind)], params=n) for kind, n in zip(kinds, params))
    profile = replace(profile, blocks=blocks, rest=replace(profile.rest, params=rest))
    return replace(found, profile=profile, block_count=len(blocks))


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
    same_rest = parameters_per_block(shallow, shallow_layers)[-1] == parameters_per_block(model, layers)[-1]
    return (shallow, shallow_layers) if same_layers and same_rest else None


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
