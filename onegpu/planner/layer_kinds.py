"""The kinds of layers in a Hugging Face model, and a shallow copy of its config that holds one of each.

Layers of one kind have the same modules, the same parameter shapes and the same per-layer config
entries (``layer_types``, ``mlp_layer_types``, ``per_layer_config``, ...), so they cost the same: the
planner measures the first layer of each kind and counts it once per layer of that kind. A Qwen2 with
sliding windows from layer 3, a Gemma 3 (five sliding layers, then a full one) or a DeepSeek (dense
layers, then mixture-of-experts ones) is measured on as many layers as it takes to meet every kind.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# where a causal LM's config keeps its number of decoder layers (encoder-decoder configs: the decoder's)
LAYER_KEYS = ("decoder_layers", "num_decoder_layers", "num_hidden_layers", "n_layer", "n_layers", "num_layers")
DECODER_CONFIGS = ("text_config", "decoder", "generator")  # where composite configs keep their decoder's


def decoder_part(values: dict[str, Any]) -> dict[str, Any]:
    """The part of a config's ``to_dict()`` that counts the decoder's layers: itself or its text/decoder part."""
    for name in DECODER_CONFIGS:
        part = values.get(name)
        if isinstance(part, dict) and layer_key(part) is not None:
            return part
    return values


def layer_key(values: dict[str, Any]) -> str | None:
    """The key under which a config's ``to_dict()`` keeps its number of layers, if it has one."""
    return next((k for k in LAYER_KEYS if isinstance(values.get(k), int) and values[k] > 0), None)


def layer_count(config: Any) -> int | None:
    part = decoder_part(config.to_dict())
    key = layer_key(part)
    return part[key] if key else None


def per_layer_entries(values: dict[str, Any]) -> dict[str, list]:
    """The decoder's config entries with one value per layer: lists as long as the layers
    (``layer_types``, per-layer windows, ...) and dicts keyed by layer index (``per_layer_config``)."""
    part = decoder_part(values)
    layers = part.get(layer_key(part) or "")
    entries = {}
    for name, value in part.items():
        if isinstance(value, (list, tuple)) and len(value) == layers:
            entries[name] = list(value)
        elif isinstance(value, dict) and value and all(_index(k, layers) is not None for k in value):
            by_index = {_index(k, layers): v for k, v in value.items()}
            entries[name] = [by_index.get(i) for i in range(layers)]
    return entries


def _index(key: Any, layers: int | None) -> int | None:
    index = key if isinstance(key, int) else int(key) if isinstance(key, str) and key.isdigit() else None
    return index if index is not None and layers and 0 <= index < layers else None


def layer_stack(model: nn.Module, layers: int) -> tuple[str, list[nn.Module]] | None:
    """The qualified name and children of the model's stack of ``layers`` layers (the largest such list)."""
    stacks = [
        (name, list(module.children()))
        for name, module in model.named_modules()
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) == layers
    ]
    stacks = [s for s in stacks if any(True for child in s[1] for _ in child.parameters())]
    if not stacks:
        return None
    return max(stacks, key=lambda s: sum(p.numel() for child in s[1] for p in child.parameters()))


def layer_kinds(layers: list[nn.Module], entries: dict[str, list]) -> list[tuple]:
    """One hashable kind per layer: its modules' classes, its parameters' shapes, its per-layer config entries."""
    return [
        (
            tuple(type(m).__name__ for m in layer.modules()),
            tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()),
            tuple((name, repr(values[index])) for name, values in sorted(entries.items())),
        )
        for index, layer in enumerate(layers)
    ]


def representative_depth(kinds: list[tuple]) -> int:
    """How many first layers hold one layer of each kind (at least two, to see a repeated block)."""
    return max(min(len(kinds), 2), *(kinds.index(kind) + 1 for kind in set(kinds)))


def shallow_copy(config: Any, *, depth: int) -> Any:
    """``config`` with only its first ``depth`` layers, built through the config's own API (``from_dict``,
    which validates it): per-layer entries keep their first ``depth`` values."""
    values = config.to_dict()
    part = decoder_part(values)
    for name in per_layer_entries(values):
        value = part[name]
        if isinstance(value, dict):
            part[name] = {k: v for k, v in value.items() if _index(k, depth) is not None}
        else:
            part[name] = type(value)(value[:depth])
    part[layer_key(part)] = depth
    return type(config).from_dict(values)
