"""The Plan: the only thing the runtime reads from the planner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from onegpu.errors import UsageError

SCHEDULES = ("none", "gpipe", "1f1b", "interleaved", "zero-bubble")
INTERLEAVED = ("interleaved", "zero-bubble")  # schedules that run two stages on each device
SHARDINGS = ("none", "optimizer", "gradients", "parameters", "hybrid")
OFFLOADS = ("none", "optimizer", "parameters")
PRECISIONS = ("fp32", "bf16", "fp16")
GB = 1e9


@dataclass(frozen=True)
class Prediction:
    """What the cost model expects of a plan, per optimizer step."""

    step_time_s: float
    tokens_per_s: float
    tflops_per_device: float
    mfu: float
    memory_per_device_bytes: int
    memory_breakdown: dict[str, int] = field(hash=False)
    time_breakdown: dict[str, float] = field(hash=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "tflops_per_device": self.tflops_per_device,
            "mfu": self.mfu,
            "memory_per_device_bytes": self.memory_per_device_bytes,
            "memory_breakdown": dict(self.memory_breakdown),
        }


@dataclass(frozen=True)
class SearchStats:
    candidates: int
    feasible: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "feasible": self.feasible, "seconds": self.seconds}


@dataclass(frozen=True)
class Rejection:
    """A plan that lost, and why: ``oom`` by how many bytes, or ``slower`` by what fraction."""

    plan: Plan
    why: str


@dataclass(frozen=True)
class Plan:
    """How the devices behind the virtual device split the work.

    ``dp * tp * pp`` devices; ``microbatches`` per optimizer step (pipeline micro-batches, or
    gradient accumulation when ``pp == 1``); ``sharding`` is the ZeRO level: ``none`` (DDP),
    ``optimizer`` (ZeRO-1), ``gradients`` (ZeRO-2), ``parameters`` (ZeRO-3 / FSDP) or ``hybrid``
    (shard inside a node, replicate across); ``activation_checkpointing`` is ``none``, ``full`` or
    a number of blocks per stage; ``offload`` moves ``optimizer`` state or ``parameters`` (with
    gradients and optimizer state) to host memory.
    """

    dp: int
    tp: int = 1
    pp: int = 1
    microbatches: int = 1
    schedule: str = "none"
    sharding: str = "none"
    activation_checkpointing: str | int = "none"
    offload: str = "none"
    precision: str = "fp32"
    predicted: Prediction | None = field(default=None, compare=False)
    alternatives: tuple[Plan, ...] = field(default=(), compare=False)
    rejected: tuple[Rejection, ...] = field(default=(), compare=False)
    search: SearchStats | None = field(default=None, compare=False)
    reason: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"Plan.{name} must be a whole number >= 1, got {value!r}")
        for name, allowed in (
            ("schedule", SCHEDULES),
            ("sharding", SHARDINGS),
            ("offload", OFFLOADS),
            ("precision", PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise UsageError(f"Plan.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        ckpt = self.activation_checkpointing
        if not (ckpt in ("none", "full") or (isinstance(ckpt, int) and not isinstance(ckpt, bool) and ckpt >= 0)):
            raise UsageError(
                f"Plan.activation_checkpointing must be 'none', 'full' or a number of blocks, got {ckpt!r}"
            )
        if self.pp > 1 and self.schedule == "none":
            raise UsageError("a pipeline plan (pp > 1) needs a schedule: gpipe, 1f1b, interleaved or zero-bubble")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def strategy(self) -> str:
        """The short name users know: ``single``, ``ddp``, ``fsdp``, or the 3D layout."""
        if self.world_size == 1:
            return "single"
        if self.tp == 1 and self.pp == 1:
            return {"none": "ddp", "optimizer": "zero1", "gradients": "zero2", "parameters": "fsdp", "hybrid": "hsdp"}[
                self.sharding
            ]
        return f"dp{self.dp}-tp{self.tp}-pp{self.pp}"

    def checkpointed_blocks(self, blocks: int) -> int:
        """How many of ``blocks`` blocks (of one stage) recompute their activations."""
        ckpt = self.activation_checkpointing
        return 0 if ckpt == "none" else blocks if ckpt == "full" else min(int(ckpt), blocks)

    def config_dict(self) -> dict[str, Any]:
        return {
            "dp": self.dp,
            "tp": self.tp,
            "pp": self.pp,
            "microbatches": self.microbatches,
            "schedule": self.schedule,
            "sharding": self.sharding,
            "activation_checkpointing": self.activation_checkpointing,
            "offload": self.offload,
            "precision": self.precision,
        }

    def describe(self) -> str:
        parts = [f"dp={self.dp}"]
        if self.tp > 1:
            parts.append(f"tp={self.tp}")
        if self.pp > 1:
            parts.append(f"pp={self.pp} ({self.schedule}, {self.microbatches} micro-batches)")
        elif self.microbatches > 1:
            parts.append(f"{self.microbatches} accumulation steps")
        parts.append(f"sharding={self.sharding}")
        if self.activation_checkpointing != "none":
            parts.append(f"checkpointing={self.activation_checkpointing}")
        if self.offload != "none":
            parts.append(f"offload={self.offload}")
        parts.append(self.precision)
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """``{"plan", "predicted", "alternatives", "search"}``: the structure ``onegpu plan --json`` prints."""
        out: dict[str, Any] = {
            "plan": self.config_dict(),
            "predicted": self.predicted.to_dict() if self.predicted else None,
        }
        out["alternatives"] = [
            {"plan": a.config_dict(), "predicted": a.predicted.to_dict() if a.predicted else None}
            for a in self.alternatives
        ]
        out["search"] = self.search.to_dict() if self.search else None
        return out
