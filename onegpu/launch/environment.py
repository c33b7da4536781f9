"""Where this process sits in a job: rank, world size and rendezvous address.

One small class per way of being launched (torchrun/elastic, SLURM, a single process),
each with ``detect()``; ``current_environment()`` picks the first that applies.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Environment:
    """Rank layout of this process and how to rendezvous with its peers."""

    kind: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def export(self) -> None:
        """Write the variables ``torch.distributed``'s ``env://`` init reads."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


class TorchElastic:
    """Launched by ``torchrun`` / ``onegpu run`` (torch.distributed.run)."""

    @staticmethod
    def detect(env: dict[str, str]) -> Environment | None:
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        world = int(env["WORLD_SIZE"])
        return Environment(
            kind="torchelastic",
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
        )


class Slurm:
    """Launched by ``srun`` with one task per device."""

    @staticmethod
    def detect(env: dict[str, str]) -> Environment | None:
        if "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
            return None
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return Environment(
            kind="slurm",
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            local_world_size=int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_NODELIST", "")),
            master_port=int(env.get("MASTER_PORT", 15000 + job_id % 10000)),
        )


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    if not nodelist:
        return "127.0.0.1"
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


SINGLE = Environment(
    kind="single",
    rank=0,
    world_size=1,
    local_rank=0,
    local_world_size=1,
    master_addr="127.0.0.1",
    master_port=29500,
)


def current_environment(env: dict[str, str] | None = None) -> Environment:
    """The environment of this process; a single process when nothing launched it."""
    env = dict(os.environ) if env is None else env
    for kind in (TorchElastic, Slurm):
        found = kind.detect(env)
        if found is not None:
            return found
    return SINGLE
