"""What each worker records of its collectives, and what it leaves in the job's directory when one hangs.

Collectives are recorded by PyTorch's Flight Recorder: the process-group backend itself (NCCL in a recorder
of its own, ``_dump_nccl_trace_json``; gloo in the generic one, ``_dump_fr_trace_json``) keeps the last ``TORCH_FR_BUFFER_SIZE`` collectives of every group in a ring in memory (sequence
number, operation, shapes, dtypes, whether it completed), whoever issued them: onegpu, FSDP2, DTensor, the
user's own ``torch.distributed`` calls. Gloo does not record point-to-point sends and receives. A backend
without the recorder still counts each group's collectives (``_get_sequence_number_for_group``), read only
when the records are written.

When a worker's watchdog fires, it writes its records (``flight/rank-N.json``) and the Python stack of each
of its threads (``stacks/rank-N.txt``), and asks the other workers to do the same through one file,
``flight/requested``: a worker that is behind is usually not in a collective and never fires itself. Each
worker looks for that file five times a second, in a thread of its own (one stat), so that a worker whose
main thread is blocked in a collective or elsewhere still answers; one whose main thread holds the GIL does not.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

FLIGHT, STACKS, REQUESTED = "flight", "stacks", "requested"
BUFFER_SIZE = 2000  # collectives kept per process (all groups together): well under a megabyte
ANSWER_EVERY_S = 0.2

_phase: dict[str, Callable[[], str | None]] = {}
_dumped: list[float] = []  # when this process wrote its records (it then answers no request)


def enable_flight_recorder() -> None:
    """Turn the Flight Recorder on for the process groups this process creates next (unless the user chose a
    size, 0 turning it off)."""
    if "TORCH_FR_BUFFER_SIZE" not in os.environ and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ:
        os.environ["TORCH_FR_BUFFER_SIZE"] = str(BUFFER_SIZE)


def follow_phase(phase: Callable[[], str | None]) -> None:
    """Where the records find what this worker does now (the watchdog's phase: forward, backward...)."""
    _phase["current"] = phase


def _attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


# NCCL's recorder (FlightRecorder<CUDAEvent>, only in CUDA builds) and the generic one of gloo and other backends
DUMPS = ("_dump_nccl_trace_json", "_dump_fr_trace_json")


def _dumps(*, collectives: bool) -> list[dict[str, Any]]:
    """What each recorder of this build holds: its groups' status, and its collectives when asked."""
    from torch._C import _distributed_c10d

    found = []
    for name in DUMPS:
        dumped = getattr(_distributed_c10d, name, None)
        if dumped is None:
            continue
        try:
            found.append(json.loads(dumped(collectives, False)))
        except (RuntimeError, ValueError, TypeError):  # a recorder that cannot dump is one without records
            continue
    return found


def pending_collectives() -> dict[str, tuple[int, int]]:
    """Per process group, (last issued, last completed) collective sequence numbers; {} without a recorder."""
    pending = {}
    for dumped in _dumps(collectives=False):
        for group, status in dumped.get("pg_status", {}).items():
            issued, completed = int(status["last_enqueued_collective"]), int(status["last_completed_collective"])
            if issued > 0:
                pending[group] = (issued, completed)
    return pending


@functools.cache
def completed_after_all(*, group: str, seq: int) -> bool:
    """Whether collective ``seq`` of ``group`` completed although the recorder's status says otherwise (gloo
    updates a group's last completed collective only when a later one is issued): read once per collective, from
    the recorder's entries."""
    for entry in _entries():
        if str(entry["process_group"][0]) == group and entry["collective_seq_id"] == seq:
            return _collective(entry)["done"]
    return True  # no longer in the ring: long done


def _entries() -> list[dict[str, Any]]:
    return [entry for dumped in _dumps(collectives=True) for entry in dumped.get("entries", [])]


def records(*, rank: int, reason: str) -> dict[str, Any]:
    """This worker's collectives as the Flight Recorder keeps them, its groups and what it does now."""
    entries = _entries()
    recorder = "flight recorder" if entries else "sequence numbers"
    phase = _phase.get("current", lambda: None)()
    return {
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "attempt": _attempt(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": time.time(),
        "reason": reason,
        "phase": phase,
        "recorder": recorder,
        "groups": _groups(),
        "collectives": [_collective(entry) for entry in entries],
    }


def _groups() -> dict[str, dict[str, Any]]:
    """Each process group's name, its workers' global ranks and how many collectives it issued."""
    try:
        from torch.distributed.distributed_c10d import _world

        return {
            str(name): {"ranks": sorted(_world.pg_group_ranks[group]), "issued": group._get_sequence_number_for_group()}
            for group, name in _world.pg_names.items()
        }
    except Exception:  # noqa: BLE001 - private torch state: records without groups still name the collectives
        return {}


def _collective(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "group": str(entry["process_group"][0]),
        "seq": entry["collective_seq_id"] or entry["p2p_seq_id"],
        "p2p": bool(entry.get("is_p2p")),
        "op": entry["profiling_name"].split(":")[-1],
        "shapes": entry.get("input_sizes", []),
        "dtypes": entry.get("input_dtypes", []),
        "done": bool(entry.get("retired")) or entry.get("state") == "completed",
        "created_ns": entry.get("time_created_ns", 0),
    }


def stacks() -> str:
    """The Python stack of every thread of this process, the main thread first."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    frames = sorted(sys._current_frames().items(), key=lambda item: item[0] != threading.main_thread().ident)
    parts = []
    for ident, frame in frames:
        parts.append(f"Thread {names.get(ident, '?')} ({ident}):\n{''.join(traceback.format_stack(frame))}")
    return "\n".join(parts)


def dump(directory: Path, *, rank: int, reason: str) -> None:
    """Write this worker's records and stacks in the job's directory, each file whole or not at all."""
    _dumped.append(time.time())
    _write(directory / FLIGHT / f"rank-{rank}.json", json.dumps(records(rank=rank, reason=reason)))
    _write(directory / STACKS / f"rank-{rank}.txt", stacks())


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(text)
    os.replace(staging, path)


def request_dumps(directory: Path, *, rank: int) -> None:
    """Ask every worker of this attempt to write its records and stacks."""
    _write(directory / FLIGHT / REQUESTED, json.dumps({"by": rank, "attempt": _attempt(), "time": time.time()}))


def wait_for_dumps(directory: Path, *, world_size: int, since: float, timeout_s: float) -> None:
    """Until every worker wrote its stacks after ``since`` (unix s), or ``timeout_s`` passed (a dead one never will)."""
    deadline = time.monotonic() + timeout_s
    paths = [directory / STACKS / f"rank-{rank}.txt" for rank in range(world_size)]
    while time.monotonic() < deadline:
        if all(path.exists() and path.stat().st_mtime >= since - 1 for path in paths):
            return
        time.sleep(ANSWER_EVERY_S / 2)


def answer_requests(directory: Path | None, *, rank: int) -> None:
    """In a worker of ``onegpu run``: a daemon thread that writes the records when another worker asks (once)."""
    if directory is None:
        return
    request, started = directory / FLIGHT / REQUESTED, time.time()

    def answer() -> None:
        while True:
            time.sleep(ANSWER_EVERY_S)
            if _dumped:
                return
            try:
                if not request.exists():
                    continue
                asked = json.loads(request.read_text())
            except (OSError, ValueError):
                continue
            if asked.get("attempt") == _attempt() and asked.get("by") != rank and asked.get("time", 0) >= started:
                dump(directory, rank=rank, reason=f"asked by rank {asked.get('by')}")
                return

    threading.Thread(target=answer, name="onegpu-flight", daemon=True).start()
