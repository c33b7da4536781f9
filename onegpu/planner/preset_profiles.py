"""The preset models' descriptions as data, so planning a preset does not import Hugging Face's model code.

The data is the inspection's own output (:func:`onegpu.planner.analysis.describe_model`), not a second
FLOP formula: each preset is inspected at a few sequence lengths and, since one sample's FLOPs and bytes
of each part are a polynomial of degree <= 2 in the sequence length (linear layers and activations grow
with it, attention's scores with its square), stored as exact rational coefficients. The writer checks
the polynomial against one more inspection at another length, and a preset whose config or inspection
no longer matches the data is inspected live. Regenerate after changing the inspection or the presets::

    python -m onegpu.planner.preset_profiles --write
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

from onegpu.plan import TensorParallelGroup
from onegpu.planner.inspection import ModelDescription
from onegpu.planner.model_presets import PRESETS
from onegpu.planner.profile import ModelProfile, PartProfile
from onegpu.planner.tensor_parallel_discovery import Candidate, TensorParallelFindings

DATA_PATH = Path(__file__).with_name("preset_profiles.json")
FIT_SEQ_LENS = (64, 128, 256)  # three lengths determine a polynomial of degree 2
CHECK_SEQ_LEN = 320  # and one more checks it
PRECISIONS = ("fp32", "bf16", "fp16")
PART_FIELDS = tuple(f.name for f in fields(PartProfile))
_cache: dict[str, Any] = {}


def preset_description(name: str, *, seq_len: int, precision: str) -> ModelDescription | None:
    """The stored description of preset ``name`` (any case) at ``seq_len`` tokens, as the inspection would
    give it; None when there is none, or it is stale (then the caller inspects the model)."""
    entry = _data().get(name.lower())
    if entry is None or entry["config"] != PRESETS.get(name.lower()) or precision not in entry["precisions"]:
        return None
    stored = entry["precisions"][precision]
    parts = [_part(part, seq_len) for part in stored["parts"]]
    profile = ModelProfile(
        name=name,
        seq_len=seq_len,
        precision=precision,
        blocks=tuple(parts[i] for i in stored["blocks"]),
        rest=parts[stored["rest"]],
        param_bytes=stored["param_bytes"],
        **entry["profile"],
    )
    return ModelDescription(
        profile=profile,
        blocks=entry["blocks"],
        block_count=entry["block_count"],
        usage=_usage(entry["usage"], entry["blocks"], entry["block_count"]),
        tensor_parallel=_findings(entry["tensor_parallel"]),
        batch_norm=entry["batch_norm"],
    )


def _data() -> dict[str, Any]:
    if "models" not in _cache:
        try:
            data = json.loads(DATA_PATH.read_text())
        except (OSError, ValueError):
            data = {}
        fresh = data.get("part_fields") == list(PART_FIELDS)  # a PartProfile with other fields: inspect live
        _cache["models"] = data.get("models", {}) if fresh else {}
    return _cache["models"]


def _part(coefficients: dict[str, list], seq_len: int) -> PartProfile:
    values = {}
    for name, (kind, *terms) in coefficients.items():
        if kind == "none":
            values[name] = None
            continue
        value = sum(Fraction(num, den) * seq_len**power for power, (num, den) in enumerate(terms))
        values[name] = int(value) if kind == "int" else float(value)
    return PartProfile(**values)


def _usage(stored: list, blocks: str | None, count: int) -> tuple[tuple[str, frozenset[int]], ...]:
    out = []
    for item in stored:
        if isinstance(item, dict):  # every block's own parameters, used by that block alone
            out += [(f"{blocks}.{i}.{suffix}", frozenset({i})) for i in range(count) for suffix in item["per_block"]]
        else:
            out.append((item[0], frozenset(item[1])))
    return tuple(out)


def _findings(data: dict | None) -> TensorParallelFindings | None:
    if data is None:
        return None
    candidates = tuple(
        Candidate(
            group=TensorParallelGroup(
                **{
                    **c["group"],
                    "columns": tuple(c["group"]["columns"]),
                    "parts": tuple(tuple(p) for p in c["group"]["parts"]),
                }
            ),
            features=tuple(tuple(f) for f in c["features"]),
            heads=tuple(tuple(h) for h in c["heads"]),
        )
        for c in data["candidates"]
    )
    return TensorParallelFindings(
        **{**data, "candidates": candidates, "reasons": tuple(data["reasons"]), "norms": tuple(data["norms"])}
    )


# ------------------------------------------------------------------------------------------------- writing


def generate(names: list[str] | None = None) -> dict[str, Any]:
    """The data file's content, inspected afresh, for ``names`` (default: every preset)."""
    models = {}
    for name in names or sorted(PRESETS):
        entry = _inspected(name)
        if entry is not None:
            models[name] = entry
    return {"part_fields": list(PART_FIELDS), "models": models}


def _inspected(name: str) -> dict[str, Any] | None:
    from onegpu.planner.analysis import describe_live  # the inspection, with transformers

    entry: dict[str, Any] = {"config": PRESETS[name], "precisions": {}}
    for precision in PRECISIONS:
        seen = [describe_live(name, seq_len=s, precision=precision) for s in FIT_SEQ_LENS]
        shared = _shared(seen[0])
        if any(_shared(d) != shared for d in seen) or entry.get("shared", shared) != shared:
            return None  # the structure changes with the length or precision: not stored
        entry["shared"] = shared
        stored = _fitted_profile([d.profile for d in seen])
        entry["precisions"][precision] = stored
    entry.update(entry.pop("shared"))
    entry = json.loads(json.dumps(entry))  # as it will be read
    for precision in PRECISIONS:  # the polynomial must give the inspection's figures at another length
        _cache["models"] = {name: entry}
        check = describe_live(name, seq_len=CHECK_SEQ_LEN, precision=precision)
        if preset_description(name, seq_len=CHECK_SEQ_LEN, precision=precision) != check:
            _cache.clear()
            return None
    _cache.clear()
    return entry


def _shared(description: ModelDescription) -> dict[str, Any]:
    """What does not depend on the sequence length: the structure, and the profile's fixed fields."""
    profile = description.profile
    fixed = ("analysed_blocks", "hidden_size", "num_heads", "num_kv_heads", "vocab_size")
    return {
        "blocks": description.blocks,
        "block_count": description.block_count,
        "usage": _stored_usage(description),
        "tensor_parallel": None if description.tensor_parallel is None else asdict(description.tensor_parallel),
        "batch_norm": description.batch_norm,
        "profile": {key: getattr(profile, key) for key in fixed},
    }


def _stored_usage(description: ModelDescription) -> list:
    """The parameter usage, every block's own parameters written once when each block's are alike."""
    blocks, count, usage = description.blocks, description.block_count, description.usage
    own = [i for i, (n, units) in enumerate(usage) if blocks and n.startswith(f"{blocks}.") and len(units) == 1]
    plain = [[n, sorted(units)] for n, units in usage]
    if not own or own != list(range(own[0], own[0] + len(own))) or len(own) % count:
        return plain
    per_block = [n.removeprefix(f"{blocks}.0.") for n, _ in usage[own[0] : own[0] + len(own) // count]]
    collapsed = [*plain[: own[0]], {"per_block": per_block}, *plain[own[-1] + 1 :]]
    return collapsed if _usage(collapsed, blocks, count) == usage else plain


def _fitted_profile(profiles: list[ModelProfile]) -> dict[str, Any]:
    parts: list[dict] = []
    indices = []
    for part_index in [*range(len(profiles[0].blocks)), None]:
        measured = [p.rest if part_index is None else p.blocks[part_index] for p in profiles]
        fitted = {name: _fitted([getattr(m, name) for m in measured]) for name in PART_FIELDS}
        if fitted not in parts:
            parts.append(fitted)
        indices.append(parts.index(fitted))
    return {"param_bytes": profiles[0].param_bytes, "parts": parts, "blocks": indices[:-1], "rest": indices[-1]}


def _fitted(values: list[float | int]) -> list:
    """``[kind, c0, c1, c2]`` (``["none"]`` when not measured): the polynomial through the values at FIT_SEQ_LENS, exact (Lagrange, rationals)."""
    if all(v is None for v in values):  # a figure the inspection does not give for this part
        return ["none"]
    xs = [Fraction(s) for s in FIT_SEQ_LENS]
    coefficients = [Fraction(0)] * 3
    for i, (x_i, y) in enumerate(zip(xs, values)):
        others = [x for j, x in enumerate(xs) if j != i]
        scale = Fraction(y) / ((x_i - others[0]) * (x_i - others[1]))
        coefficients[0] += scale * others[0] * others[1]
        coefficients[1] -= scale * (others[0] + others[1])
        coefficients[2] += scale
    kind = "int" if isinstance(values[0], int) else "float"
    return [kind, *([c.numerator, c.denominator] for c in coefficients)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {DATA_PATH.name}")
    args = parser.parse_args(argv)
    data = generate()
    text = json.dumps(data, indent=None, separators=(",", ":"), sort_keys=True) + "\n"
    if args.write:
        DATA_PATH.write_text(text)
    missing = sorted(set(PRESETS) - set(data["models"]))
    print(f"{len(data['models'])} presets stored" + (f"; inspected live: {', '.join(missing)}" if missing else ""))


if __name__ == "__main__":
    main()
