"""Entry point of every worker process: ``python -m onegpu.launch.worker SCRIPT ARGS...``.

Sets CPU threads, keeps only rank 0's printed lines (every rank's errors still reach
stderr), then runs the user's script as ``__main__``.
"""

from __future__ import annotations

import os
import runpy
import sys

from onegpu.errors import UsageError
from onegpu.launch.failures import record_failure
from onegpu.launch.workers import threads_per_worker


def main(argv: list[str]) -> None:
    script, *args = argv
    rank = int(os.environ.get("RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    import torch

    torch.set_num_threads(threads_per_worker(local_world))
    if rank != 0 and os.environ.get("ONEGPU_PRINT_ALL_RANKS") != "1":
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except UsageError as error:  # the launcher prints it once, without a traceback
        record_failure(f"{error}", usage=True)
        sys.exit(1)
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            record_failure(f"exited with {exit_.code}")
        raise
    except BaseException as error:
        record_failure(f"{type(error).__name__}: {error}")
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
