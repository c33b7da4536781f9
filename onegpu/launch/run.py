"""Start N workers running a script, on top of torch.distributed.run (torchrun / elastic)."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from onegpu.errors import LaunchError
from onegpu.launch.failures import root_cause
from onegpu.launch.workers import threads_per_worker
from onegpu.pool.lease import leased_devices
from onegpu.settings import worker_environment


def launch(script: str, args: list[str], *, workers: int, wait: bool = True) -> int:
    """Run ``script ARGS`` as ``workers`` local processes, each on a device leased from the pool for as
    long as the job runs (waiting in line for them unless ``wait`` is False); returns 0 or raises LaunchError."""
    if not Path(script).is_file():
        raise LaunchError(f"script {script!r} not found: give the path of a Python file, e.g. onegpu run train.py")
    if workers < 1:
        raise LaunchError(f"--workers {workers}: a job needs at least 1 worker")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_worker(workers)))
    torchrun_args = [
        "--standalone",
        f"--nproc-per-node={workers}",
        "--max-restarts=0",
        "--monitor-interval=0.1",
        f"--rdzv-id={uuid.uuid4().hex[:12]}",
        "--module",
        "onegpu.launch.worker",
        script,
        *args,
    ]
    # onegpu reports a failed job itself, in one line; torchelastic's own log would repeat it (each of its
    # loggers has a level of its own)
    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    lost: list[str] = []

    def stop_on_lost_lease(reason: str) -> None:  # torchelastic stops the workers on SIGTERM
        lost.append(reason)
        os.kill(os.getpid(), signal.SIGTERM)

    with tempfile.TemporaryDirectory(prefix="onegpu-job-") as status:
        # the workers end with this process, however it ends, and leave their memory and their end in status
        os.environ.update(worker_environment(launcher_pid=os.getpid(), status_dir=Path(status)))
        try:
            with leased_devices(count=workers, wait=wait, on_lost=stop_on_lost_lease) as lease:
                os.environ.update(
                    worker_environment(
                        job=lease.job, devices=lease.devices, launcher_pid=os.getpid(), status_dir=Path(status)
                    )
                )
                if lease.pool.devices[0].kind == "cuda":  # worker i sees the i-th leased device as its own
                    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, lease.devices))
                run(get_args_parser().parse_args(torchrun_args))
        except ChildFailedError as failure:
            raise LaunchError(root_cause(failure, status=Path(status))) from None
        except SignalException as signal_:  # Ctrl-C, a scheduler's SIGTERM, or a lost lease: the workers were stopped
            raise LaunchError(
                lost[0] if lost else f"stopped by {signal_.sigval.name}; all workers were stopped"
            ) from None
    return 0
