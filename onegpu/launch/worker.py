"""Entry point of every worker process: ``python -m onegpu.launch.worker SCRIPT ARGS...``.

Ties the worker's life to its launcher's, sets CPU threads, keeps only rank 0's printed lines
(every rank's errors still reach stderr), runs the user's script as ``__main__``, and ends the
process itself, leaving its exit code for the launcher.
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback

from onegpu.errors import UsageError
from onegpu.launch.clean_exit import ends_with_finish, finish, is_forked
from onegpu.launch.failures import is_peer_gone, record_failure
from onegpu.launch.flight import answer_requests
from onegpu.launch.lifeline import die_with_launcher
from onegpu.launch.status import record_end
from onegpu.launch.workers import threads_per_worker
from onegpu.settings import settings


def run_script(script: str, args: list[str]) -> int:
    """Run the user's script; returns the process's exit code, after recording any failure."""
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except UsageError as error:  # the launcher prints it once, without a traceback
        record_failure(f"{error}", usage=True)
        return 1
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if code:
            if not isinstance(exit_.code, int):
                print(exit_.code, file=sys.stderr)
            record_failure(f"exited with {exit_.code}")
        return code
    except BaseException as error:
        message = f"{type(error).__name__}: {error}"
        if is_peer_gone(message):  # a consequence of another worker's end: the launcher names that one
            print(f"onegpu: rank {os.environ.get('RANK', '0')} stopped: another worker is gone", file=sys.stderr)
        else:
            traceback.print_exc()
        record_failure(message)
        return 1
    return 0


def main(argv: list[str]) -> None:
    die_with_launcher()
    ends_with_finish()
    script, *args = argv
    rank = int(os.environ.get("RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    import torch

    # the user's OMP_NUM_THREADS when given (as torchrun honours it), else an equal share of the cores
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or threads_per_worker(local_world)))
    if rank != 0 and not settings().print_all_ranks:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker
    from onegpu.launch.reporting import start_reporting

    start_reporting()
    answer_requests(settings().status_dir, rank=rank)  # records and stacks when another worker finds a hang
    if rank == 0 and settings().metrics:  # the script may import clip_grad_norm_ by name
        from onegpu.launch.clip_norms import record_clipping

        record_clipping()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart and rank == 0:  # torchelastic started every worker again after one failed (onegpu run --max-restarts)
        limit = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")
        print(f"onegpu: a worker failed: all workers started again (restart {restart} of {limit})", file=sys.stderr)
    code = run_script(script, args)
    record_end(rank=rank, code=code)
    finish(code)


# what torchelastic sets for each worker; the rest of a forked worker's environment is its launcher's
ELASTIC_VARIABLES = frozenset(
    {"RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "GROUP_WORLD_SIZE",
     "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}
)  # fmt: skip


def forked(environment: dict[str, str], script: str, *args: str) -> None:
    """Entry point of a worker forked from the launcher's preloaded fork server: the launcher's environment of
    this launch (the server's may be older), torchelastic's per-worker variables, unbuffered output as
    ``python -u``, a session of its own as torchrun's workers have; then as ``main``."""
    sys.stderr = sys.__stderr__  # the fork server's is silenced (launch/fork_server.py)
    os.setsid()
    is_forked()
    own = {k: v for k, v in os.environ.items() if k in ELASTIC_VARIABLES or k.startswith("TORCHELASTIC_")}
    os.environ.clear()
    os.environ.update(environment | own)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=True)
    main([script, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
