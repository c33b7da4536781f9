"""The full account of a hung job, from the records and stacks its workers left (``onegpu doctor JOB``).

Per worker: its last collectives in the group the job hung in (sequence number, operation, shapes, state),
what it was doing, or that it left no record; the gap between the workers; and each worker's Python stack,
the script's and onegpu's frames only (the files in ``stacks/`` hold every frame).
"""

from __future__ import annotations

import re
from pathlib import Path

from onegpu.launch.flight import STACKS
from onegpu.launch.hang import Collective, Hang, RankRecord, find_hang, hang_line, read_records

SHOWN = 5  # collectives shown per worker
FRAME = re.compile(r'^  File "(?P<path>[^"]+)", line (?P<line>\d+), in (?P<function>.+)$')
THREAD = re.compile(r"^Thread (?P<name>.+) \((?P<ident>\d+)\):$")
LIBRARIES = re.compile(r"site-packages|dist-packages|/lib/python\d|^<frozen ")
LAUNCHER = "onegpu/launch/worker.py"  # the entry of every worker: the same three frames on each


def diagnose(job_dir: Path) -> str | None:
    """What the job's workers were doing when it hung, or None when they left no record of a hang."""
    records = read_records(job_dir)
    hang = find_hang(records)
    if hang is None:
        return None
    line = hang_line(hang, directory=job_dir, job=job_dir.name).split("; stacks in ")[0]
    parts = [f"hang: {line}", "", _collectives_title(hang)]
    for rank in sorted({*hang.members, *records}):
        parts.extend(_collectives(hang, records.get(rank), rank=rank))
    parts.extend(
        ["", _gap(hang), "", f"Python stacks (the script's and onegpu's frames; all of them in {job_dir / STACKS}):"]
    )
    for rank in sorted({*hang.members, *records}):
        parts.extend(_stack(job_dir / STACKS / f"rank-{rank}.txt", rank=rank))
    return "\n".join(parts)


def _collectives_title(hang: Hang) -> str:
    members = ",".join(map(str, hang.members))
    return f"Last collectives of process group {hang.group} (ranks {members}), per worker:"


def _collectives(hang: Hang, record: RankRecord | None, *, rank: int) -> list[str]:
    if record is None:
        return [f"  rank {rank}: no record (dead before it could write one, or its main thread held the GIL)"]
    doing = f"in {record.phase}" if record.phase else "outside onegpu's communicating phases"
    lines = [f"  rank {rank}: {record.reason}; {doing}; recorded by {record.recorder}"]
    shown = record.in_group(hang.group)[-SHOWN:]
    if not shown:
        lines.append(f"    {record.issued.get(hang.group, 0)} collectives issued (no recorder: counts only)")
    lines.extend(f"    {_row(collective)}" for collective in shown)
    return lines


def _row(collective: Collective) -> str:
    state = "completed" if collective.done else "WAITING"
    return f"#{collective.seq:<6} {collective.signature:<40} {state}"


def _gap(hang: Hang) -> str:
    at = hang.reached
    where = ", ".join(f"rank {rank} #{seq}" for rank, seq in sorted(at.items()))
    missing = f"; no record from rank{'s' * (len(hang.missing) > 1)} {','.join(map(str, hang.missing))}"
    gap = f"Sequence numbers reached: {where}{missing if hang.missing else ''}."
    if hang.kind == "mismatch":
        odd = ",".join(map(str, hang.odd))
        return f"{gap} Rank{'s' * (len(hang.odd) > 1)} {odd} issued another collective #{hang.seq} than the others."
    if hang.behind:
        lags = ", ".join(f"rank {rank} by {hang.seq - at[rank]}" for rank in sorted(hang.behind))
        return f"{gap} Behind: {lags}."
    return gap


def _stack(path: Path, *, rank: int) -> list[str]:
    try:
        text = path.read_text()
    except OSError:
        return [f"  rank {rank}: no stack written"]
    lines = [f"  rank {rank}:"]
    for name, frames in _threads(text):
        own = [frame for frame in frames if not LIBRARIES.search(frame[0]) and not frame[0].endswith(LAUNCHER)]
        if name.startswith("onegpu-") or (name != "MainThread" and not own):
            continue  # onegpu's own watchers, and threads of the libraries only
        lines.append(
            f"    thread {name} ({len(frames) - len(own)} frames of Python, libraries and the launcher not shown):"
        )
        lines.extend(f"      {path_}:{line} in {function}: {code}" for path_, line, function, code in own)
        if frames and frames[-1] not in own:  # where in a library it waits
            path_, line, function, _ = frames[-1]
            lines.append(f"      ... in {function} ({Path(path_).name}:{line})")
    return lines


def _threads(text: str) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """The threads of a stacks file, each with its frames (path, line, function, source line)."""
    threads: list[tuple[str, list[tuple[str, str, str, str]]]] = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if match := THREAD.match(line):
            threads.append((match["name"], []))
        elif (match := FRAME.match(line)) and threads:
            following = lines[index + 1] if index + 1 < len(lines) else ""
            code = following.strip() if following.startswith("    ") else ""
            threads[-1][1].append((match["path"], match["line"], match["function"], code))
    return threads
