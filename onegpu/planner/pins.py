"""Pins: values the user fixes, by the names onegpu uses or those other auto-parallel tools use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onegpu.errors import UsageError
from onegpu.plan import OFFLOADS, SCHEDULES, SHARDINGS

ALIASES = {
    "num_stages": "pp",
    "num_micro_batches": "microbatches",
    "activation_recomputation": "activation_checkpointing",
}
PRECISION_OF = {"bf16": "bf16", "fp16": "fp16", "off": "fp32", "fp32": "fp32", "none": "fp32"}


@dataclass(frozen=True)
class Pins:
    """What the search must respect; None leaves a dimension free."""

    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    min_pp: int = 1
    microbatches: int | None = None
    schedule: str | None = None
    shardings: tuple[str, ...] = SHARDINGS
    activation_checkpointing: str | int | None = None
    offloads: tuple[str, ...] = OFFLOADS
    precision: str | None = None
    compile: bool | None = None  # None: compiled blocks where measured faster on the job's devices


KNOWN = ["dp", "tp", "pp", "microbatches", "schedule", "sharding", "activation_checkpointing", "offload",
         "mixed_precision", "compile", *ALIASES, "distribute_parameter", "pipeline_parallel"]  # fmt: skip
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_pins(**raw: Any) -> Pins:
    """Normalize pins given in Python or on the command line; unknown names and values are errors."""
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None:
            continue
        name = ALIASES.get(name, name)
        if name in values:
            raise UsageError(f"pin {name!r} was given twice (directly and by an alias): give it once")
        values[name] = value
    unknown = [name for name in values if name not in KNOWN]
    if unknown:
        raise UsageError(f"unknown pin {unknown[0]!r}: known pins are {', '.join(KNOWN)}")
    pins: dict[str, Any] = {}
    for name in ("dp", "tp", "pp", "microbatches"):
        if name in values:
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name}={value!r}: give a whole number >= 1")
            pins[name] = value
    if "pipeline_parallel" in values:
        if values["pipeline_parallel"]:
            pins["min_pp"] = 2
        elif pins.setdefault("pp", 1) != 1:
            raise UsageError(f"pipeline_parallel=False contradicts pp={pins['pp']}: drop one of them")
    pins.update(_choices(values))
    if "activation_checkpointing" in values:
        pins["activation_checkpointing"] = _checkpointing(values["activation_checkpointing"])
    if "mixed_precision" in values:
        precision = str(values["mixed_precision"]).lower()
        if precision not in PRECISION_OF:
            raise UsageError(f"mixed_precision={precision!r} is not known: use bf16, fp16 or off")
        pins["precision"] = PRECISION_OF[precision]
    if "compile" in values:
        pins["compile"] = _switch("compile", values["compile"])
    return Pins(**pins)


def _switch(name: str, value: Any) -> bool:
    """A pin that is on or off: a bool, or true/false (yes/no, on/off) as text."""
    text = str(value).lower()
    if isinstance(value, bool) or text in TRUE + FALSE:
        return value if isinstance(value, bool) else text in TRUE
    raise UsageError(f"{name}={value!r}: use true or false")


def _choices(values: dict[str, Any]) -> dict[str, Any]:
    """The pins that name one of a few choices (schedule, sharding, offload), checked against them."""
    pins: dict[str, Any] = {}
    for name, allowed, field in (("schedule", SCHEDULES[1:], "schedule"), ("sharding", SHARDINGS, "shardings"),
                                 ("offload", OFFLOADS, "offloads")):  # fmt: skip
        if name in values:
            choice = str(values[name]).lower()
            if choice not in allowed:
                raise UsageError(f"{name}={choice!r} is not known: use one of {', '.join(allowed)}")
            pins[field] = choice if field == "schedule" else (choice,)
    if "distribute_parameter" in values:
        wanted = ("parameters", "hybrid") if values["distribute_parameter"] else ("none", "optimizer", "gradients")
        pins["shardings"] = tuple(s for s in pins.get("shardings", SHARDINGS) if s in wanted)
        if not pins["shardings"]:
            raise UsageError("distribute_parameter contradicts the sharding pin: drop one of them")
    return pins


def _checkpointing(value: Any) -> str | int:
    if isinstance(value, bool):
        return "full" if value else "none"
    if isinstance(value, int) and value >= 0:
        return value
    text = str(value).lower()
    if text in ("none", "selective", "full"):
        return text
    if text.isdigit():
        return int(text)
    raise UsageError(f"activation_checkpointing={value!r}: use none, selective, full, or a number of blocks")
