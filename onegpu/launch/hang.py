"""Which worker a hung job waits for, read from the records its workers left (``launch/flight.py``).

The collectives of one process group carry the same sequence numbers on every worker that issued them. The
workers that issued the most wait in the last one; a worker that issued fewer is behind (its last collective
says where it stopped); a worker with no record at all is missing (dead before it could write one); workers
that issued the same number but of different operations or shapes disagree (one skipped a collective or took
another code path); when every worker waits in the same collective, none is behind.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onegpu.launch.flight import FLIGHT, STACKS

SAME_INCIDENT_S = 120.0  # records written this long before the newest (or in an earlier attempt) are of another hang


@dataclass(frozen=True)
class Collective:
    """One collective as a worker's Flight Recorder kept it."""

    group: str
    seq: int
    op: str
    shapes: tuple
    dtypes: tuple
    done: bool
    created_ns: int = 0

    @property
    def name(self) -> str:
        return f"{self.op} #{self.seq}"

    @property
    def signature(self) -> str:
        shapes = ", ".join("x".join(map(str, shape)) or "scalar" for shape in self.shapes)
        return f"{self.op} [{shapes}] {'/'.join(self.dtypes)}".strip()


@dataclass(frozen=True)
class RankRecord:
    """What one worker wrote when the hang was found."""

    rank: int
    world_size: int
    attempt: int  # torchelastic's restart count
    time: float
    reason: str
    phase: str | None
    recorder: str
    groups: dict[str, tuple[int, ...]]
    issued: dict[str, int]  # the group's own count of collectives, known without the recorder too
    collectives: tuple[Collective, ...]

    def in_group(self, group: str) -> list[Collective]:
        return sorted((c for c in self.collectives if c.group == group), key=lambda c: c.seq)

    def last_seq(self, group: str) -> int:
        return max([self.issued.get(group, 0), *(c.seq for c in self.in_group(group))])

    def at(self, group: str, seq: int) -> Collective | None:
        return next((c for c in self.in_group(group) if c.seq == seq), None)

    @classmethod
    def of_json(cls, data: dict[str, Any]) -> RankRecord:
        return cls(
            rank=int(data["rank"]),
            world_size=int(data.get("world_size", 1)),
            attempt=int(data.get("attempt", 0)),
            time=float(data.get("time", 0.0)),
            reason=str(data.get("reason", "")),
            phase=data.get("phase"),
            recorder=str(data.get("recorder", "")),
            groups={name: tuple(g.get("ranks", ())) for name, g in data.get("groups", {}).items()},
            issued={name: int(g.get("issued", 0)) for name, g in data.get("groups", {}).items()},
            collectives=tuple(
                Collective(
                    group=str(c["group"]),
                    seq=int(c["seq"]),
                    op=str(c["op"]),
                    shapes=tuple(tuple(s) for s in c.get("shapes", ())),
                    dtypes=tuple(c.get("dtypes", ())),
                    done=bool(c.get("done")),
                    created_ns=int(c.get("created_ns", 0)),
                )
                for c in data.get("collectives", ())
                if not c.get("p2p")
            ),
        )


def read_records(directory: Path) -> dict[int, RankRecord]:
    """Each worker's records of the job's last hang (``flight/rank-N.json``), by rank; {} when none."""
    found = {}
    for path in sorted((directory / FLIGHT).glob("rank-*.json")):
        try:
            record = RankRecord.of_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found[record.rank] = record
    if not found:
        return {}
    last = max(found.values(), key=lambda r: (r.attempt, r.time))
    return {rank: r for rank, r in found.items() if r.attempt == last.attempt and r.time >= last.time - SAME_INCIDENT_S}


@dataclass(frozen=True)
class Hang:
    """Where the job stood: the group and sequence number the most advanced workers wait in, and who is not there."""

    kind: str  # "behind", "missing", "mismatch" (workers disagree on the collective), "stuck" (all in the same one)
    group: str
    members: tuple[int, ...]
    seq: int
    waiting: dict[int, Collective | None]  # worker -> its collective at ``seq`` (None: only counted)
    behind: dict[int, Collective | None]  # worker -> its last collective in the group
    reached: dict[int, int]  # worker -> the number of its last collective in the group
    missing: tuple[int, ...]
    phases: dict[int, str | None]

    @property
    def odd(self) -> tuple[int, ...]:
        """The waiting workers whose collective differs from the most common one (mismatch)."""
        known = {rank: c.signature for rank, c in self.waiting.items() if c is not None}
        if len(set(known.values())) < 2:
            return ()
        common, count = Counter(known.values()).most_common(1)[0]
        if count * 2 <= len(known):  # no majority: name every worker's collective
            return tuple(sorted(known))
        return tuple(sorted(rank for rank, sig in known.items() if sig != common))


def find_hang(records: dict[int, RankRecord]) -> Hang | None:
    """The hang the records show, or None when no worker waits in a collective."""
    if not records:
        return None
    group = _stuck_group(records)
    if group is None:
        return None
    world = max(r.world_size for r in records.values())
    members = next((r.groups[group] for r in records.values() if r.groups.get(group)), tuple(range(world)))
    present = [rank for rank in members if rank in records]
    top = max(records[rank].last_seq(group) for rank in present)
    waiting = {rank: records[rank].at(group, top) for rank in present if records[rank].last_seq(group) == top}
    behind = {rank: _last(records[rank], group) for rank in present if rank not in waiting}
    missing = tuple(rank for rank in members if rank not in records)
    hang = Hang(
        kind="",
        group=group,
        members=tuple(members),
        seq=top,
        waiting=waiting,
        behind=behind,
        reached={rank: records[rank].last_seq(group) for rank in present},
        missing=missing,
        phases={rank: r.phase for rank, r in records.items()},
    )
    kind = "mismatch" if hang.odd else "behind" if behind else "missing" if missing else "stuck"
    return Hang(**{**hang.__dict__, "kind": kind})


def _stuck_group(records: dict[int, RankRecord]) -> str | None:
    """The group of the oldest collective a worker still waits in; without a recorder, a group whose workers
    issued different numbers of collectives (or the whole job's group when a watchdog fired)."""
    pending = [c for r in records.values() for c in r.collectives if not c.done]
    if pending:
        return min(pending, key=lambda c: (c.created_ns, c.seq)).group
    if any(r.collectives for r in records.values()):
        return None  # recorded, and nothing pending: no hang
    counts: dict[str, set[int]] = {}
    for record in records.values():
        for group, issued in record.issued.items():
            counts.setdefault(group, set()).add(issued)
    uneven = [group for group, seen in counts.items() if len(seen) > 1]
    if uneven:
        return uneven[0]
    fired = any(r.reason.startswith("watchdog") for r in records.values())
    return next(iter(counts), None) if fired else None


def _last(record: RankRecord, group: str) -> Collective | None:
    collectives = record.in_group(group)
    return collectives[-1] if collectives else None


def _ranks(ranks: list[int] | tuple[int, ...]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, sorted(ranks)))}"


def _where(hang: Hang, rank: int, collective: Collective | None, *, seq: int) -> str:
    what = collective.name if collective is not None else f"collective #{seq}"
    phase = hang.phases.get(rank)
    return f"{what} ({phase})" if phase else what


def _group(hang: Hang, world: int) -> str:
    return (
        "" if len(hang.members) >= world and hang.group == "0" else f" of group {hang.group} ({_ranks(hang.members)})"
    )


def hang_line(hang: Hang, *, directory: Path, job: str | None) -> str:
    """The job's one line on a hang: who is behind or missing, the collective and its number on each worker."""
    world = max([*hang.members, *hang.waiting, *hang.behind], default=0) + 1
    where = _group(hang, world)
    waiting = sorted(hang.waiting)
    first = hang.waiting[waiting[0]] if waiting else None
    verb = "waits" if len(waiting) == 1 else "wait"
    waits = f"{_ranks(waiting)} {verb} in {_where(hang, waiting[0], first, seq=hang.seq)}{where}" if waiting else ""
    if hang.kind == "mismatch":
        odd = hang.odd
        each = "; ".join(
            f"{_ranks([rank])} is in {_signature(hang.waiting[rank])}"
            + (f" ({hang.phases[rank]})" if hang.phases.get(rank) else "")
            for rank in sorted(hang.waiting)
        )
        said = (
            f"{_ranks(odd)} took another path at collective #{hang.seq}{where}: {each} "
            f"(a collective skipped or added on {'these ranks' if len(odd) > 1 else 'that rank'})"
        )
    elif hang.kind == "stuck":
        said = f"every worker waits in the same collective: {waits}; none is behind (a device or the network is stuck?)"
    else:
        parts = []
        if hang.behind:
            behind = sorted(hang.behind)
            verb = "is" if len(behind) == 1 else "are"
            lasts = ", ".join(
                f"{_ranks([rank])}'s last collective is "
                + (_where(hang, rank, hang.behind[rank], seq=hang.reached[rank]) if hang.reached[rank] else "none")
                + f" ({hang.seq - hang.reached[rank]} behind)"
                for rank in behind
            )
            parts.append(f"{_ranks(behind)} {verb} behind: {waits}; {lasts}")
        if hang.missing:
            verb = "is" if len(hang.missing) == 1 else "are"
            lead = f"{waits}; " if not hang.behind else ""
            parts.append(f"{lead}{_ranks(hang.missing)} {verb} missing (no record: dead before it could write one)")
        said = "; ".join(parts)
    stacks = directory / STACKS
    return f"{said}; stacks in {stacks}; run `onegpu doctor {job or directory}`"


def _signature(collective: Collective | None) -> str:
    return collective.signature if collective is not None else "an unrecorded collective"


def explain(directory: Path, *, job: str | None = None) -> str | None:
    """The one line on the hang the job's records show, or None."""
    hang = find_hang(read_records(directory))
    return hang_line(hang, directory=directory, job=job) if hang is not None else None
