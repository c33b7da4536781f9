"""Start N workers running a script, on top of torch.distributed.run (torchrun / elastic), or on the nodes of a
Ray pool (``launch.ray_run``).

With ``max_restarts``, torchelastic restarts every worker when one fails (its own restart loop), while
this process keeps the job's device leases. When ``onegpu resize`` asks for another size, the workers
save their state and end; this loop then grows or shrinks the lease and starts them again.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from onegpu.errors import LaunchError
from onegpu.launch.failures import root_cause
from onegpu.launch.flight import enable_flight_recorder
from onegpu.launch.forked_workers import run_forked
from onegpu.launch.job_record import end_record, record_resize, start_record
from onegpu.launch.ray_run import run_on_ray
from onegpu.launch.resizing import job_directory, take_resize
from onegpu.launch.status import attempt_directory
from onegpu.launch.workers import threads_per_worker
from onegpu.pool.lease import JobLease, leased_devices, resize_lease
from onegpu.settings import worker_environment


def launch(
    script: str,
    args: list[str],
    *,
    workers: int,
    wait: bool = True,
    max_restarts: int = 0,
    log_dir: Path | None = None,
) -> int:
    """Run ``script ARGS`` as ``workers`` local processes, each on a device leased from the pool for as
    long as the job runs (waiting in line for them unless ``wait`` is False); all of them are started
    again, up to ``max_restarts`` times, when one fails. The job's record (``job.json``) and its metrics stay
    in its directory (its metrics in ``log_dir`` when given). Returns 0 or raises LaunchError."""
    if not Path(script).is_file():
        raise LaunchError(f"script {script!r} not found: give the path of a Python file, e.g. onegpu run train.py")
    if workers < 1:
        raise LaunchError(f"--workers {workers}: a job needs at least 1 worker")
    if max_restarts < 0:
        raise LaunchError(f"--max-restarts {max_restarts}: give how many times a failed job may restart, 0 or more")
    log_dir = _log_directory(log_dir)
    # onegpu reports a failed job itself, in one line; torchelastic's own log would repeat it (each of its
    # loggers has a level of its own), and so would torch.multiprocessing's, which stops forked workers
    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic", "torch.multiprocessing.spawn"]:
        if name.startswith(("torch.distributed.elastic", "torch.multiprocessing")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    lost: list[str] = []
    threads = os.environ.get("OMP_NUM_THREADS")  # the user's, kept at every size; else a share of the cores

    def stop_on_lost_lease(reason: str) -> None:  # torchelastic stops the workers on SIGTERM
        lost.append(reason)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        with _sigterm_raises(), leased_devices(count=workers, wait=wait, on_lost=stop_on_lost_lease) as lease:
            with job_directory(lease.job) as status, _recorded(status, lost=lost):
                start_record(status, lease=lease, script=script, args=args, log_dir=log_dir or status)
                while True:
                    try:
                        if lease.pool.backend == "ray":
                            lease = run_on_ray(
                                script, args, lease=lease, status=status, max_restarts=max_restarts, log_dir=log_dir
                            )
                        else:
                            _run_workers(script, args, lease=lease, status=status, max_restarts=max_restarts,
                                         threads=threads, log_dir=log_dir)  # fmt: skip
                    except ChildFailedError as failure:  # reported while the workers' status files are there
                        raise LaunchError(_report(failure, status=status, max_restarts=max_restarts)) from None
                    size = take_resize(status)
                    if size is None:
                        return 0
                    lease = resize_lease(lease, count=size)
                    record_resize(status, lease=lease)
    except SignalException as signal_:  # Ctrl-C, a scheduler's SIGTERM, or a lost lease: the workers were stopped
        raise LaunchError(_stopped(signal_, lost)) from None


def _stopped(signal_: SignalException, lost: list[str]) -> str:
    return lost[0] if lost else f"stopped by {signal_.sigval.name}; all workers were stopped"


def _log_directory(log_dir: Path | None) -> Path | None:
    """``--log-dir``, made now (absolute: the workers may run elsewhere), or a one-line error."""
    if log_dir is None:
        return None
    try:
        log_dir = Path(log_dir).expanduser().absolute()
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LaunchError(
            f"--log-dir {log_dir}: cannot make it ({error.strerror}): give a directory you can write"
        ) from None
    return log_dir


@contextmanager
def _recorded(status: Path, *, lost: list[str]) -> Iterator[None]:
    """The job's end in its record: exit 0, or 1 and its one-line error, however the block ends."""
    try:
        yield
    except LaunchError as error:
        end_record(status, code=1, error=str(error))
        raise
    except SignalException as signal_:
        end_record(status, code=1, error=_stopped(signal_, lost))
        raise
    except BaseException as error:
        end_record(status, code=1, error=f"{type(error).__name__}: {error}")
        raise
    else:
        end_record(status, code=0, error=None)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (a lost lease, onegpu cancel, a scheduler) raises SignalException in this process from the start,
    as torchelastic's own handler does once workers run: the leases are then released and the job's line said,
    also when it comes before the workers start."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(failure: ChildFailedError, *, status: Path, max_restarts: int) -> str:
    """The one line on a failed job: its last attempt's cause, and how many restarts came before it (torchelastic
    gives up only once every restart is used)."""
    cause = root_cause(failure, status=attempt_directory(status, max_restarts))
    return f"{cause} (after {max_restarts} restart{'s' if max_restarts > 1 else ''})" if max_restarts else cause


def _run_workers(
    script: str,
    args: list[str],
    *,
    lease: JobLease,
    status: Path,
    max_restarts: int,
    threads: str | None,
    log_dir: Path | None,
) -> None:
    """One worker per leased device, until they end (torchelastic restarting them up to ``max_restarts``
    times); the workers end with this process, however it ends, and leave their memory and their end in
    ``status``."""
    workers = len(lease.devices)
    os.environ.update(
        worker_environment(
            job=lease.job, devices=lease.devices, launcher_pid=os.getpid(), status_dir=status, log_dir=log_dir
        )
    )
    os.environ["OMP_NUM_THREADS"] = threads or str(threads_per_worker(workers))
    if lease.pool.devices[0].kind == "cpu":  # torch.compile's own pool of compiling processes: the worker's share too
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", os.environ["OMP_NUM_THREADS"])
    enable_flight_recorder()  # also for a script that makes its process group itself
    # PyTorch's C++ warnings only (not Python's): DDP's reducer warns every replicated job that it looks for
    # parameters a call leaves out, which onegpu does on purpose (a model may skip some); set it to see them
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if max_restarts:  # a store of each attempt's own: a restarted gloo/NCCL mesh would read the last one's
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # addresses from the shared one (pytorch#135712)
    if lease.pool.devices[0].kind == "cuda":  # worker i sees the i-th leased device as its own
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, lease.devices))
    options = [
        f"--nproc-per-node={workers}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.1",
        f"--rdzv-id={uuid.uuid4().hex[:12]}",
    ]
    # CUDA cannot be forked (nor is a process's /proc there on every system): a fresh process each, as torchrun's
    if lease.pool.devices[0].kind != "cpu" or not sys.platform.startswith("linux"):
        run(get_args_parser().parse_args(["--standalone", *options, "--module", "onegpu.launch.worker", script, *args]))
        return
    run_forked(script, args, options=options)
