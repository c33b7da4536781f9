"""The Plan: the only thing the runtime reads from the planner."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from onegpu.errors import UsageError

Sharding = Literal["none", "parameters"]


@dataclass(frozen=True)
class Plan:
    """How the workers behind the virtual device split the work.

    ``sharding="none"`` replicates the model on every worker (DDP); ``"parameters"`` shards
    parameters, gradients and optimizer state over them (FSDP2, ZeRO-3).
    """

    dp: int
    sharding: Sharding
    reason: str = ""

    def __post_init__(self) -> None:
        if self.dp < 1:
            raise UsageError(f"Plan.dp must be at least 1, got {self.dp}")
        if self.sharding not in ("none", "parameters"):
            raise UsageError(f"Plan.sharding must be 'none' or 'parameters', got {self.sharding!r}")

    @property
    def strategy(self) -> str:
        """The short name users know: ``single`` (one worker), ``ddp`` or ``fsdp``."""
        if self.dp == 1:
            return "single"
        return "ddp" if self.sharding == "none" else "fsdp"

    def to_dict(self) -> dict:
        return asdict(self)
