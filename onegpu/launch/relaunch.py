"""``onegpu.init()``: let ``python train.py`` start the workers itself."""

from __future__ import annotations

import os
import sys

from onegpu.launch.environment import current_environment
from onegpu.settings import settings


def init(*, workers: int | None = None, max_restarts: int = 0) -> None:
    """Make the running script one of N workers.

    Called as the first line of a script started with plain ``python train.py``, it starts
    N workers running the same script (through ``onegpu run``'s launcher) and exits with
    their status; inside a worker, or under torchrun/SLURM, it joins the job and returns.
    ``max_restarts``: as ``onegpu run --max-restarts``, all workers start again (up to that many
    times) when one fails; the script resumes from its last state with ``onegpu.load_state``.
    """
    from onegpu.errors import LaunchError
    from onegpu.launch.process_group import current_worker
    from onegpu.launch.run import launch
    from onegpu.launch.workers import worker_count

    env = current_environment()
    if env.is_distributed or settings().launched:
        current_worker(env)
        return
    try:
        count = worker_count(workers)
    except ValueError as exc:
        sys.exit(f"onegpu: {exc}")
    script = sys.argv[0]
    if (count == 1 and not max_restarts) or not script or not os.path.isfile(script):
        current_worker(env)  # one worker, or an interactive session: run here
        return
    try:
        code = launch(script, sys.argv[1:], workers=count, max_restarts=max_restarts)
    except (LaunchError, ValueError) as exc:
        sys.stderr.write(f"onegpu: {exc}\n")
        code = 1
    sys.exit(code)
