"""A worker ends when its launcher does, however the launcher dies (``kill -9`` included).

torchelastic starts each worker in a session of its own, so neither a signal to the launcher's
process group nor the launcher's death reaches it. On Linux the kernel sends the worker SIGKILL when
the launcher's thread that started it ends (the parent-death signal); a daemon thread also checks
twice a second that the launcher is still its parent, for other systems and for a launcher that
died before the signal was armed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from onegpu.settings import settings

PR_SET_PDEATHSIG = 1
CHECK_EVERY_S = 0.5


def die_with_launcher() -> None:
    """In a worker of ``onegpu run``: end this process as soon as its launcher is gone."""
    launcher = settings().launcher_pid
    if launcher is None:
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = os.getppid()  # the launcher, or its fork server
    _end_if_orphaned(launcher, parent)
    threading.Thread(target=_watch, args=(launcher, parent), name="onegpu-lifeline", daemon=True).start()


def _watch(launcher: int, parent: int) -> None:
    while True:
        time.sleep(CHECK_EVERY_S)
        _end_if_orphaned(launcher, parent)


def _end_if_orphaned(launcher: int, parent: int) -> None:
    if os.getppid() != parent or not _alive(launcher):  # re-parented, or the launcher died: the job with it
        os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process now has the number: the launcher's is gone
        return False
    return True
