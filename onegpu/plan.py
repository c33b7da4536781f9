"""The Plan: how the devices behind the virtual device split the work.

It is the only contract between the planner, which chooses it, and the runtime, which executes it:
frozen, validated when built, and serialisable (``to_json`` / ``from_json``), so that a plan made
in one process runs unchanged in others. Everything the runtime needs to build the layout is a
field: degrees and mesh order, stage cuts and which parameters each stage holds, the tensor-parallel
groups, checkpointing, sharding, offload, precision, micro-batches and schedule. The planner's
predictions and alternatives ride along for display and never affect execution.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from onegpu.errors import UsageError

MESH_DIMS = ("dp", "pp", "tp")  # one device mesh: tensor-parallel ranks neighbours, replicas outermost
SCHEDULES = ("none", "gpipe", "1f1b", "interleaved", "zero-bubble")
INTERLEAVED = ("interleaved", "zero-bubble")  # schedules that run two stages on each pipeline worker
SHARDINGS = ("none", "optimizer", "gradients", "parameters", "hybrid")
OFFLOADS = ("none", "optimizer", "parameters")
PRECISIONS = ("fp32", "bf16", "fp16")
CHECKPOINTING = ("none", "selective", "full")  # or a number of blocks per stage, fully recomputed
GB = 1e9


@dataclass(frozen=True)
class TensorParallelGroup:
    """Column layers whose outputs reach only one row layer; names relative to a block."""

    columns: tuple[str, ...]
    row: str
    parts: tuple[tuple[str, int], ...] = ()  # a fused column's number of equal parts (GPT-2's qkv: 3)
    heads: int | None = None  # attention heads of the first column that has heads (per part)
    parent: str = ""  # the module holding the columns and the row
    parent_input: int | str = 0  # where the parent takes the hidden states: position, or keyword
    parent_positional: int = 1  # how many positional arguments the parent takes

    def parts_of(self, column: str) -> int:
        return dict(self.parts).get(column, 1)


@dataclass(frozen=True)
class TensorParallelLayout:
    """What ``tp`` neighbouring workers split: every block's groups, the vocabulary-parallel embedding and
    head, and, with sequence parallelism, the per-token layers between the groups (the norms)."""

    groups: tuple[TensorParallelGroup, ...]
    embedding: str | None = None
    head: str | None = None
    sequence_parallel: bool = False
    norms: tuple[str, ...] = ()  # per-token layers of a block outside its groups, relative to the block
    first_block_positional: int = 1  # positional arguments the first block takes
    last_block_outputs: int = 0  # tensors the last block returns in a tuple; 0: a bare tensor


@dataclass(frozen=True)
class StageLayout:
    """Where the model is cut into pipeline stages, and which parameters outside the cut units each holds.

    ``cuts`` are the first unit of stages 1..S-1, a unit being a repeated block (``traced=False``) or a
    computing node of the model's traced graph. ``outside`` lists the parameters that are not in a block
    (embeddings, the head, a skip connection's projection) with the stages that use them; a parameter
    several stages use has one value and summed gradients. Unused ones stay with stage 0.
    """

    cuts: tuple[int, ...]
    traced: bool = False
    outside: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def stages(self) -> int:
        return len(self.cuts) + 1


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
            "time_breakdown": dict(self.time_breakdown),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prediction:
        return cls(**{**data, "time_breakdown": data.get("time_breakdown", {})})


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

    ``dp * tp * pp`` devices on one (dp, pp, tp) mesh; ``microbatches`` per optimizer step (pipeline
    micro-batches, or gradient accumulation when ``pp == 1``); ``sharding`` is the ZeRO level: ``none``
    (DDP), ``optimizer`` (ZeRO-1), ``gradients`` (ZeRO-2), ``parameters`` (ZeRO-3 / FSDP) or ``hybrid``
    (FSDP inside groups of ``shard_group`` neighbouring replicas, those of one node; the groups replicate
    one another, HSDP); ``activation_checkpointing`` is ``none``, ``full``, a number of blocks per stage
    (those recompute their whole forward in backward), or ``selective`` (every block recomputes its cheap
    operators and keeps its matmul and attention outputs); ``offload`` moves ``optimizer`` state or ``parameters`` (with gradients
    and optimizer state) to host memory; ``compile`` runs each repeated block's forward through
    ``torch.compile`` (the planner chooses it only where it measured it faster).

    The layout of this model: ``blocks`` is the module path of its repeated blocks' container (None
    when it has none); ``stages`` where a pipeline cuts it; ``tensor_parallel`` what ``tp`` workers
    split. A plan without them (``Plan(dp=2, pp=2, ...)`` written by hand) is completed for the model
    by ``prepare``.
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
    shard_group: int | None = None
    compile: bool = False
    blocks: str | None = None
    stages: StageLayout | None = None
    tensor_parallel: TensorParallelLayout | None = None
    predicted: Prediction | None = field(default=None, compare=False)
    alternatives: tuple[Plan, ...] = field(default=(), compare=False)
    rejected: tuple[Rejection, ...] = field(default=(), compare=False)
    search: SearchStats | None = field(default=None, compare=False)
    reason: str = field(default="", compare=False)
    # the unmeasured assumptions the prediction rests on (datasheet figures, unseen links, an uninspected model)
    confidence: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "microbatches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"Plan.{name} must be a whole number >= 1, got {value!r}")
        for name, allowed in (
            ("schedule", SCHEDULES),
            ("sharding", SHARDINGS),
            ("offload", OFFLOADS),
            ("precision", PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise UsageError(f"Plan.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        self._check_shard_group()
        if not isinstance(self.compile, bool):
            raise UsageError(f"Plan.compile must be True or False, got {self.compile!r}")
        ckpt = self.activation_checkpointing
        if not (ckpt in CHECKPOINTING or (isinstance(ckpt, int) and not isinstance(ckpt, bool) and ckpt >= 0)):
            raise UsageError(
                f"Plan.activation_checkpointing must be 'none', 'full', 'selective' or a number of blocks, got {ckpt!r}"
            )
        if self.pp > 1 and self.schedule == "none":
            raise UsageError("a pipeline plan (pp > 1) needs a schedule: gpipe, 1f1b, interleaved or zero-bubble")
        if self.pp == 1 and self.schedule != "none":
            raise UsageError(f"Plan.schedule={self.schedule!r} needs pp > 1: use schedule='none' without a pipeline")
        if self.stages is not None and self.stages.stages != self.pipeline_stages:
            raise UsageError(
                f"Plan.stages has {self.stages.stages} stages but pp={self.pp} with the {self.schedule} schedule "
                f"runs {self.pipeline_stages}: cut the model into {self.pipeline_stages}"
            )

    def _check_shard_group(self) -> None:
        group = self.shard_group
        if self.sharding != "hybrid":
            if group is not None:
                raise UsageError(
                    f"Plan.shard_group={group!r} is for sharding='hybrid': leave it out with {self.sharding!r}"
                )
        elif isinstance(group, bool) or not isinstance(group, int) or group < 1 or self.dp % group:
            raise UsageError(
                f"Plan(sharding='hybrid') needs shard_group, how many replicas shard together (a divisor of "
                f"dp={self.dp}, such as the replicas of one node), got {group!r}"
            )

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def pipeline_stages(self) -> int:
        """Stages of the pipeline: one per pipeline worker, two under an interleaved schedule."""
        return self.pp * (2 if self.schedule in INTERLEAVED else 1)

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

    @property
    def fitted(self) -> bool:
        """Whether the plan carries the layout its pipeline or tensor parallelism needs (the model's cuts, groups)."""
        return (self.pp == 1 or self.stages is not None) and (self.tp == 1 or self.tensor_parallel is not None)

    @property
    def replica_size(self) -> int:
        """Workers of one data-parallel replica (its stages and tensor-parallel ranks): they read one slice."""
        return self.pp * self.tp

    def worker_stages(self, pipeline_rank: int) -> list[int]:
        """The stages pipeline worker ``pipeline_rank`` runs: its own, or two (``r`` and ``r + pp``) interleaved."""
        return [pipeline_rank, pipeline_rank + self.pp] if self.schedule in INTERLEAVED else [pipeline_rank]

    def checkpointed_blocks(self, blocks: int) -> int:
        """How many of ``blocks`` blocks (of one stage) recompute their whole forward."""
        ckpt = self.activation_checkpointing
        return 0 if ckpt in ("none", "selective") else blocks if ckpt == "full" else min(int(ckpt), blocks)

    @property
    def selective(self) -> bool:
        """Whether every block recomputes only its cheap operators (selective activation recomputation)."""
        return self.activation_checkpointing == "selective"

    def config_dict(self) -> dict[str, Any]:
        """Every field the runtime reads, as plain JSON data."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.compare}
        for name in ("stages", "tensor_parallel"):
            out[name] = None if out[name] is None else asdict(out[name])
        return out

    def to_json(self) -> str:
        """The plan as JSON: every field the runtime reads, and the planner's notes when it has them (its prediction,
        reason, runners-up, rejections, search figures and confidence), which a job's record keeps (plan.json)."""
        return json.dumps({**self.config_dict(), **self._notes()}, sort_keys=True)

    def _notes(self) -> dict[str, Any]:
        notes = {
            "predicted": self.predicted.to_dict() if self.predicted else None,
            "alternatives": [{**a.config_dict(), **a._notes()} for a in self.alternatives],
            "rejected": [{"plan": {**r.plan.config_dict(), **r.plan._notes()}, "why": r.why} for r in self.rejected],
            "search": self.search.to_dict() if self.search else None,
            "reason": self.reason,
            "confidence": list(self.confidence),
        }
        return {key: value for key, value in notes.items() if value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """The plan ``config_dict`` (with the notes ``to_json`` adds) describes; unknown keys are an error that
        names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"a plan has no field {unknown[0]!r}: known fields are {', '.join(sorted(known))}")
        values = {**data, **_planner_notes(cls, data)}
        if values.get("stages") is not None:
            stages = values["stages"]
            outside = tuple((name, tuple(used)) for name, used in stages.get("outside", ()))
            values["stages"] = StageLayout(cuts=tuple(stages["cuts"]), traced=stages["traced"], outside=outside)
        if values.get("tensor_parallel") is not None:
            layout = dict(values["tensor_parallel"])
            layout["groups"] = tuple(
                TensorParallelGroup(
                    **{**g, "columns": tuple(g["columns"]), "parts": tuple(tuple(p) for p in g.get("parts", ()))}
                )
                for g in layout["groups"]
            )
            layout["norms"] = tuple(layout.get("norms", ()))
            values["tensor_parallel"] = TensorParallelLayout(**layout)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def describe(self) -> str:
        parts = [f"dp={self.dp}"]
        if self.tp > 1:
            parts.append(f"tp={self.tp}")
        if self.pp > 1:
            parts.append(f"pp={self.pp} ({self.schedule}, {self.microbatches} micro-batches)")
        elif self.microbatches > 1:
            parts.append(f"{self.microbatches} accumulation steps")
        parts.append(f"sharding={self.sharding}" + (f" (groups of {self.shard_group})" if self.shard_group else ""))
        if self.activation_checkpointing != "none":
            parts.append(f"checkpointing={self.activation_checkpointing}")
        if self.offload != "none":
            parts.append(f"offload={self.offload}")
        parts.append(self.precision)
        if self.compile:
            parts.append("compiled blocks")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """``{"plan", "predicted", "alternatives", "search", "confidence"}``: what ``onegpu plan --json`` prints."""
        return {
            "plan": self.config_dict(),
            "predicted": self.predicted.to_dict() if self.predicted else None,
            "alternatives": [
                {"plan": a.config_dict(), "predicted": a.predicted.to_dict() if a.predicted else None}
                for a in self.alternatives
            ],
            "search": self.search.to_dict() if self.search else None,
            "confidence": list(self.confidence),
        }

    def without_layout(self) -> Plan:
        """The plan's choices alone, not yet fitted to a model."""
        return replace(self, blocks=None, stages=None, tensor_parallel=None)


def _planner_notes(cls: type[Plan], data: dict[str, Any]) -> dict[str, Any]:
    """The planner's notes in a plan's JSON (``Plan.to_json``), as the Plan's fields."""
    notes: dict[str, Any] = {
        "alternatives": tuple(cls.from_dict(a) for a in data.get("alternatives", ())),
        "rejected": tuple(Rejection(cls.from_dict(r["plan"]), r["why"]) for r in data.get("rejected", ())),
        "confidence": tuple(data.get("confidence", ())),
    }
    if data.get("predicted"):
        notes["predicted"] = Prediction.from_dict(data["predicted"])
    if data.get("search"):
        notes["search"] = SearchStats(**data["search"])
    return notes
