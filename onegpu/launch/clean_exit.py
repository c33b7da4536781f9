"""End a worker process without C++ teardown: torch's and gloo's background threads can abort a finished
process while static objects are destroyed ("terminate called without an active exception"), turning a
successful job into a failed one. ``finish`` ends it like a normal exit (atexit handlers, flushed files) and
then leaves at once with its exit code.

Workers ``onegpu run`` starts call ``finish`` themselves. A process that joins the job under another
launcher (torchrun, SLURM) calls ``end_cleanly_at_exit``: its exit code is followed (an uncaught exception,
``sys.exit(n)``) so that the last exit handler can leave with it.
"""

from __future__ import annotations

import atexit
import gc
import io
import logging
import os
import sys

_status = {"code": 0, "armed": False, "forked": False}


def finish(code: int) -> None:
    """Run the exit handlers, flush every open file, and end the process with ``code``; a worker forked by
    torchelastic ends with its return value handed back (``_hand_back_to_torchelastic``)."""
    atexit._run_exitfuncs()
    _flush_open_files()
    if code == 0 and _status["forked"]:
        _hand_back_to_torchelastic()
        return
    os._exit(code)


def _hand_back_to_torchelastic() -> None:
    """Give torchelastic the forked worker's return value (None) itself: torchelastic counts a forked worker done
    once its function returned a value, and would keep the process alive until every worker returned; ended now,
    its connections close, and a worker still waiting for it in a collective (a script that returned on one rank
    only) fails at once, as with a worker started as a command. With a torch whose ``_wrap`` keeps the value
    elsewhere, the worker returns as torchelastic expects."""
    frame = sys._getframe()
    while frame is not None and not hasattr(frame.f_locals.get("ret_val_"), "put"):
        frame = frame.f_back
    if frame is not None:
        frame.f_locals["ret_val_"].put(None)
        os._exit(0)


def is_forked() -> None:
    """This worker was forked by torchelastic's process context (``launch.worker.forked``)."""
    _status["forked"] = True


def ends_with_finish() -> None:
    """This process calls ``finish`` itself (an ``onegpu run`` worker): ``end_cleanly_at_exit`` does nothing."""
    _status["armed"] = True


def end_cleanly_at_exit() -> None:
    """Leave with the script's exit code after the exit handlers registered before this call (once)."""
    if _status["armed"]:
        return
    _status["armed"] = True
    previous_hook, previous_exit = sys.excepthook, sys.exit

    def excepthook(kind, value, trace) -> None:
        _status["code"] = 130 if issubclass(kind, KeyboardInterrupt) else 1
        previous_hook(kind, value, trace)

    def exit_(status: object = None) -> None:
        _status["code"] = 0 if status is None else status if isinstance(status, int) else 1
        previous_exit(status)

    sys.excepthook, sys.exit = excepthook, exit_
    atexit.register(_leave)  # first registered of onegpu's handlers: runs after the later ones


def _leave() -> None:
    logging.shutdown()
    from multiprocessing import util

    util._exit_function()  # what multiprocessing does at exit: its finalizers, its children stopped
    _flush_open_files()
    os._exit(_status["code"])


def _flush_open_files() -> None:
    """Write what files the script left open still buffer (an interpreter exit would, as it frees them)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    for obj in gc.get_objects():
        try:  # by its type alone: an object's own __class__ may be a proxy that warns or raises when read
            if issubclass(type(obj), io.IOBase) and not obj.closed and obj.writable():
                obj.flush()
        except Exception:  # noqa: BLE001 - a file that cannot be flushed now is one the exit could not flush either
            pass
