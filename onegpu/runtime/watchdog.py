"""Stop a worker that waits too long inside a collective, naming the worker the job waits for.

A worker whose peer died or took another code path would otherwise hang forever in gloo/nccl. Two things are
watched by a daemon thread: the phases onegpu marks as communicating (forward, backward, optimizer step), and,
where the process group's Flight Recorder runs (``launch/flight.py``), every collective, the script's own
included. When one lasts longer than the collective timeout, the worker writes its records and stacks, asks
the other workers for theirs, and ends with the line that names the worker that is behind, missing, or on
another collective (``launch/hang.py``); the launcher then stops the whole job.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time

from onegpu.launch.failures import record_failure
from onegpu.launch.flight import (
    completed_after_all,
    dump,
    follow_phase,
    pending_collectives,
    request_dumps,
    wait_for_dumps,
)
from onegpu.launch.hang import explain
from onegpu.settings import settings

ANSWERS_WAITED_S = 3.0  # how long a worker that fired waits for the others' records (a dead one never writes)


class Watchdog:
    """Tracks the current communicating phase of this worker and its start time."""

    def __init__(self, *, rank: int, timeout_s: float) -> None:
        self.rank = rank
        self.timeout_s = timeout_s
        self._phase: tuple[str, float] | None = None
        self._pending: dict[str, tuple[int, float]] = {}  # group -> (collective waited in, since)
        follow_phase(lambda: self.phase)
        thread = threading.Thread(target=self._watch, name="onegpu-watchdog", daemon=True)
        thread.start()

    def enter(self, phase: str) -> None:
        self._phase = (phase, time.monotonic())

    def leave(self) -> None:
        self._phase = None

    @property
    def phase(self) -> str | None:
        current = self._phase
        return None if current is None else current[0]

    def _watch(self) -> None:
        interval = min(1.0, self.timeout_s / 10)
        while True:
            time.sleep(interval)
            stuck = self._stuck_in_phase() or self._stuck_in_collective()
            if stuck is not None:
                self._fire(*stuck)

    def _stuck_in_phase(self) -> tuple[str, float] | None:
        current = self._phase
        if current is None:
            return None
        phase, started = current
        waited = time.monotonic() - started
        return (phase, waited) if waited > self.timeout_s else None

    def _stuck_in_collective(self) -> tuple[str, float] | None:
        """A collective issued and not completed for longer than the timeout (one status read of the recorder)."""
        now, stuck = time.monotonic(), None
        for group, (issued, completed) in pending_collectives().items():
            if issued <= completed:
                self._pending.pop(group, None)
                continue
            seen, since = self._pending.get(group, (None, now))
            if seen != issued:
                self._pending[group], since = (issued, now), now
            if now - since > self.timeout_s and not completed_after_all(group=group, seq=issued):
                stuck = (f"collective #{issued} of group {group}", now - since)
        return stuck

    def _fire(self, where: str, waited: float) -> None:
        message = (
            f"rank {self.rank} stuck for {waited:.0f} s in {where}: another worker died or took a "
            f"different code path (raise ONEGPU_COLLECTIVE_TIMEOUT if this step is legitimately "
            f"slower than {self.timeout_s:g} s)"
        )
        explained = _explain(rank=self.rank, reason=f"watchdog: stuck for {waited:.0f} s in {where}")
        if explained is not None:
            message = f"{explained} (rank {self.rank} waited {waited:.0f} s: ONEGPU_COLLECTIVE_TIMEOUT)"
        record_failure(message, usage=explained is not None)  # the launcher says an explained hang as it is
        if explained is None:
            sys.stderr.write(f"onegpu: {message}\n")
            sys.stderr.flush()
        os._exit(124)


def _explain(*, rank: int, reason: str) -> str | None:
    """Write this worker's records, gather the others', and name the worker the job waits for (None outside
    ``onegpu run``, or when the records show nothing)."""
    directory = settings().status_dir
    if directory is None:
        return None
    try:
        since = time.time()
        dump(directory, rank=rank, reason=reason)
        request_dumps(directory, rank=rank)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        wait_for_dumps(directory, world_size=world, since=since, timeout_s=ANSWERS_WAITED_S)
        return explain(directory, job=settings().job)
    except Exception as error:  # noqa: BLE001 - the report of a hang must not hide the hang
        sys.stderr.write(f"onegpu: rank {rank} could not write its records of the hang: {error}\n")
        return None


@functools.cache
def process_watchdog(*, rank: int, timeout_s: float) -> Watchdog:
    """The one watchdog of this worker process (prepare() may be called more than once)."""
    return Watchdog(rank=rank, timeout_s=timeout_s)
