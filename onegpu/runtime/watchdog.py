"""Stop a worker that waits too long inside a collective, naming the rank and the operation.

A worker whose peer died or took another code path would otherwise hang forever in
gloo/nccl. onegpu marks the phases that communicate (forward, backward, optimizer step);
a daemon thread ends the worker with a one-line report when one lasts longer than the
collective timeout, and the launcher then stops the whole job.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time

from onegpu.launch.failures import record_failure


class Watchdog:
    """Tracks the current communicating phase of this worker and its start time."""

    def __init__(self, *, rank: int, timeout_s: float) -> None:
        self.rank = rank
        self.timeout_s = timeout_s
        self._phase: tuple[str, float] | None = None
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
            current = self._phase
            if current is None:
                continue
            phase, started = current
            waited = time.monotonic() - started
            if waited > self.timeout_s:
                message = (
                    f"rank {self.rank} stuck for {waited:.0f} s in {phase}: another worker died or took a "
                    f"different code path (raise ONEGPU_COLLECTIVE_TIMEOUT if this step is legitimately "
                    f"slower than {self.timeout_s:g} s)"
                )
                record_failure(message)
                sys.stderr.write(f"onegpu: {message}\n")
                sys.stderr.flush()
                os._exit(124)


@functools.cache
def process_watchdog(*, rank: int, timeout_s: float) -> Watchdog:
    """The one watchdog of this worker process (prepare() may be called more than once)."""
    return Watchdog(rank=rank, timeout_s=timeout_s)
