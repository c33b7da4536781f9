"""The workers of a job on a Ray pool: one worker process per leased device, on the node Ray placed it on.

Each device's bundle of the job's placement group holds a small actor, a ``WorkerHost``, that starts
``python -m onegpu.launch.worker SCRIPT ARGS`` on its node with torch's own rendezvous (``env://``: the
c10d store on rank 0, at an address rank 0's host found free), streams its lines back to the launcher and
reports how it ended. Ranks are contiguous per node, so the planner sees ``LOCAL_WORLD_SIZE`` devices per
node. When the launcher dies, Ray ends its actors and the workers end with them (``launch.lifeline``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the launcher's variables a worker on another node must not take: that node has its own
NODE_LOCAL = {"PATH", "HOME", "PWD", "OLDPWD", "SHLVL", "HOSTNAME", "TMPDIR", "_", "CUDA_VISIBLE_DEVICES"}
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker is: its rank and place, and the process to run."""

    rank: int
    local_rank: int
    device: int
    node: str
    script: str
    args: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    status_dir: str


@dataclass(frozen=True)
class WorkerEnd:
    """How one worker ended: its exit code, its error file's content, and its status files."""

    rank: int
    code: int
    error: dict | None
    status: dict[str, str]
    time_us: int


class _WorkerHost:
    """Runs one worker on this node (as a Ray actor)."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._out: list[str] = []
        self._err: list[str] = []
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._ended = threading.Event()
        self._scratch = Path(tempfile.mkdtemp(prefix="onegpu-worker-"))
        self._refused: str | None = None

    def address(self) -> tuple[str, int]:
        """This node's address and a port free on it, for the job's rendezvous."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def start(self, spec: WorkerSpec) -> str | None:
        """Start the worker; a one-line reason when it cannot start here."""
        if not Path(spec.script).is_file():
            return (
                f"the script {spec.script} is not on node {socket.gethostname()}: put it at the same path on every node"
            )
        env = {k: v for k, v in os.environ.items() if k in NODE_LOCAL or k.startswith("RAY_")}
        env.update(spec.env)
        status = Path(spec.status_dir)
        if not status.is_dir():  # not a shared filesystem: the status files travel back with the end
            status = self._scratch / "status"
            status.mkdir(exist_ok=True)
        env.update(
            ONEGPU_STATUS_DIR=str(status),
            ONEGPU_LAUNCHER_PID=str(os.getpid()),
            TORCHELASTIC_ERROR_FILE=str(self._scratch / "error.json"),
        )
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(spec.env["LOCAL_WORLD_SIZE"]))))
        self._status = status / f"attempt-{spec.env['TORCHELASTIC_RESTART_COUNT']}"
        cwd = spec.cwd if Path(spec.cwd).is_dir() else str(self._scratch)
        # the thread that starts the worker lives as long as it: the worker's parent-death signal follows that thread
        argv = (sys.executable, "-m", "onegpu.launch.worker", spec.script, *spec.args)
        threading.Thread(target=self._run, args=(argv, env, cwd), daemon=True).start()
        self._started.wait()
        return self._refused

    def _run(self, argv: tuple[str, ...], env: dict[str, str], cwd: str) -> None:
        try:
            self._process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            self._refused = f"the worker could not start on node {socket.gethostname()}: {exc}"
            return self._started.set()
        self._started.set()
        readers = [
            threading.Thread(target=self._read, args=(self._process.stdout, self._out), daemon=True),
            threading.Thread(target=self._read, args=(self._process.stderr, self._err), daemon=True),
        ]
        for reader in readers:
            reader.start()
        self._process.wait()
        for reader in readers:
            reader.join(timeout=5)
        self._ended.set()

    def _read(self, stream: Any, into: list[str]) -> None:
        for line in iter(stream.readline, b""):
            with self._lock:
                into.append(line.decode(errors="replace"))

    def output(self) -> tuple[str, str]:
        """What the worker printed since the last call: (stdout, stderr)."""
        with self._lock:
            out, err = "".join(self._out), "".join(self._err)
            self._out.clear()
            self._err.clear()
        return out, err

    def wait(self, rank: int) -> WorkerEnd:
        """Block until the worker ends."""
        self._started.wait()
        self._ended.wait()
        error = None
        with contextlib.suppress(OSError, ValueError):
            error = json.loads((self._scratch / "error.json").read_text())
        files = {}
        if self._status.is_dir():
            files = {f.name: f.read_text() for f in self._status.iterdir() if not f.name.startswith(".")}
        shutil.rmtree(self._scratch, ignore_errors=True)  # what the launcher needs travels back in this answer
        return WorkerEnd(
            rank=rank, code=self._process.returncode, error=error, status=files, time_us=time.time_ns() // 1000
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period (as torchelastic stops its workers)."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        if not self._ended.wait(STOP_GRACE_S):
            self._process.kill()


@functools.cache
def worker_host_actor() -> Any:
    """The ``WorkerHost`` Ray actor class (made when first needed: Ray is an optional extra)."""
    import ray

    return ray.remote(num_cpus=0, max_concurrency=4)(_WorkerHost)


def forwarded_environment() -> dict[str, str]:
    """The launcher's variables its workers inherit on every node (as torchrun's workers inherit them)."""
    return {k: v for k, v in os.environ.items() if k not in NODE_LOCAL and not k.startswith("RAY_")}
