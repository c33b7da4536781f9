"""Faults during a job's life: its launcher killed, a worker killed, its leases no longer renewable, a save
on one worker only. Nothing is left running, the right worker is named, and usage is what was used."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from bad_input import processes_of
from conftest import ROOT
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from onegpu.launch.failures import record_failure, root_cause
from onegpu.pool.ledger import open_ledger

JOB = str(ROOT / "tests" / "scripts" / "faults_job.py")
TTL_S = 2.0


class Job:
    """``onegpu run --workers 2 faults_job.py MODE`` in a session of its own, in a home of its own."""

    def __init__(self, tmp_path: Path, mode: str, *args: str, env: dict | None = None) -> None:
        self.home, self.out, self.tag = tmp_path / "home", tmp_path / "out", f"faults-{uuid.uuid4().hex[:12]}"
        self.home.mkdir()
        self.out.mkdir()
        (self.home / "pool.toml").write_text("cpu_slots = 4\nslot_memory_gb = 2\n")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "onegpu", "run", "--workers", "2", JOB, mode, str(self.out), self.tag, *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a shell gives a job
            env={**os.environ, "OMP_NUM_THREADS": "1", "ONEGPU_HOME": str(self.home), **(env or {})},
        )

    def workers(self, timeout: float = 180) -> dict[int, dict]:
        """Each worker's pid and the time of its first step, once both have trained a step."""
        deadline = time.monotonic() + timeout
        files = [self.out / f"rank-{rank}.pid" for rank in (0, 1)]
        while not all(file.exists() for file in files):
            assert self.process.poll() is None, self.process.stderr.read()
            assert time.monotonic() < deadline, "the workers never started training"
            time.sleep(0.2)
        return {rank: json.loads(file.read_text()) for rank, file in enumerate(files)}

    def finish(self) -> tuple[int, str]:
        """The launcher's exit code and the last line it wrote."""
        _, stderr = self.process.communicate(timeout=120)
        return self.process.returncode, stderr.strip().splitlines()[-1]

    def ledger(self):
        return open_ledger(url=None, home=self.home, ttl_s=TTL_S)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's reaping is left


def gone_within(tag: str, seconds: float) -> float | None:
    """When the last process of ``tag`` was gone (time.time()), or None if some still run after ``seconds``."""
    deadline = time.monotonic() + seconds
    while processes_of(tag):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return time.time()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "its process group"])
def test_killing_the_launcher_stops_its_workers_and_bills_what_they_ran(tmp_path, target):
    job = Job(tmp_path, "train", "--steps", "2000", env={"ONEGPU_LEASE_TTL": str(TTL_S)})
    started = min(worker["started"] for worker in job.workers().values())
    time.sleep(2)  # mid-training
    if target == "launcher":
        os.kill(job.process.pid, signal.SIGKILL)
    else:
        os.killpg(job.process.pid, signal.SIGKILL)
    job.process.wait(timeout=30)
    gone = gone_within(job.tag, 10)
    assert gone is not None, f"workers outlived their launcher: {processes_of(job.tag)}"
    time.sleep(TTL_S + 0.5)  # the leases, no longer renewed, expire
    assert job.ledger().holdings() == []
    intervals = job.ledger().intervals()
    assert sorted(i.device for i in intervals) == [0, 1]
    for interval in intervals:  # billed from before the first step to within a renewal of the workers' end
        assert interval.start <= started and gone - TTL_S <= interval.end <= gone, (interval, started, gone)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_worker_killed_by_sigkill_is_named_as_possibly_out_of_memory_with_its_memory(tmp_path, rank):
    job = Job(tmp_path, "train", "--steps", "2000")
    os.kill(job.workers()[rank]["pid"], signal.SIGKILL)
    code, last = job.finish()
    assert code == 1
    assert last.startswith(f"onegpu: worker rank {rank} was killed by SIGKILL, possibly out of memory (its memory: "), (
        last
    )
    assert gone_within(job.tag, 10) is not None


@pytest.mark.slow
def test_a_job_whose_leases_cannot_be_renewed_is_stopped_and_says_why(tmp_path):
    job = Job(tmp_path, "train", "--steps", "2000", env={"ONEGPU_LEASE_TTL": "4", "ONEGPU_LEDGER_BUSY_S": "2"})
    pids = [worker["pid"] for worker in job.workers().values()]
    ledger = sqlite3.connect(job.home / "ledger.sqlite", isolation_level=None)
    ledger.execute("BEGIN IMMEDIATE")  # another process holds the ledger: renewals fail
    try:
        deadline = time.monotonic() + 60
        while any(map(alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        ledger.execute("ROLLBACK")  # the launcher can now end the leases
    code, last = job.finish()
    assert code == 1 and not any(map(alive, pids))
    assert last.startswith("onegpu: the job was stopped because its device leases could not be renewed for "), last
    assert job.ledger().holdings() == []


@pytest.mark.slow
def test_saving_on_the_main_process_only_works_when_every_worker_holds_the_model(tmp_path):
    from safetensors.torch import load_file

    job = Job(tmp_path, "save-on-main", "--steps", "3", "--strategy", "ddp")
    code, last = job.finish()
    assert code == 0, last
    assert set(load_file(job.out / "checkpoint" / "model.safetensors")) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def failed_job(tmp_path, monkeypatch, **workers) -> ChildFailedError:
    """A job whose workers ended as given: ``rank1=(-9, None, when)`` or ``rank0=(1, "message", when)``."""
    failures = {}
    for name, (exitcode, message, when) in workers.items():
        rank = int(name.removeprefix("rank"))
        error_file = tmp_path / f"error-{rank}.json"
        if message is not None:
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
            monkeypatch.setattr(time, "time_ns", lambda when=when: int(when * 1e9))
            record_failure(message)
            monkeypatch.undo()
        failures[rank] = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))
        failures[rank].timestamp = int(when)  # torchelastic's time: whole seconds
    return ChildFailedError(name="worker", failures=failures)


GLOO = "RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:63152. GLHF!"


def test_peers_stopped_by_torchelastic_or_cut_off_by_gloo_are_not_blamed_for_a_sigkill(tmp_path, monkeypatch):
    (tmp_path / "rank-1.memory").write_text(json.dumps({"resident": 512 * 2**20, "peak": 3 * 2**30}))
    job = failed_job(tmp_path, monkeypatch, rank0=(1, GLOO, 100.2), rank1=(-9, None, 100.3), rank2=(-15, None, 100.4))
    assert root_cause(job, status=tmp_path) == (
        "worker rank 1 was killed by SIGKILL, possibly out of memory (its memory: 512 MB at the last measure, "
        "3.0 GB at peak): if so, use a smaller batch or more workers"
    )


def test_a_worker_killed_when_it_would_not_stop_is_not_blamed_for_the_error_that_stopped_the_job(tmp_path, monkeypatch):
    # rank 1 raised; rank 0 ignored torchelastic's SIGTERM and was killed 30 s later
    job = failed_job(tmp_path, monkeypatch, rank0=(-9, None, 130.5), rank1=(1, "RuntimeError: boom", 100.5))
    assert root_cause(job, status=tmp_path) == "worker rank 1 failed (exit code 1): RuntimeError: boom"


def test_the_first_of_two_errors_is_the_cause(tmp_path, monkeypatch):
    job = failed_job(tmp_path, monkeypatch, rank0=(1, "ValueError: second", 100.6), rank1=(1, "KeyError: first", 100.5))
    assert root_cause(job, status=tmp_path) == "worker rank 1 failed (exit code 1): KeyError: first"


def test_a_worker_stopped_from_outside_by_sigterm_is_named_before_the_peer_it_cut_off(tmp_path, monkeypatch):
    job = failed_job(tmp_path, monkeypatch, rank0=(1, GLOO, 100.5), rank1=(-15, None, 101.0))
    assert root_cause(job, status=tmp_path) == "worker rank 1 was killed by SIGTERM"


def test_when_every_worker_lost_its_peers_the_first_to_say_so_is_named(tmp_path, monkeypatch):
    job = failed_job(tmp_path, monkeypatch, rank0=(1, GLOO + " 0", 100.6), rank1=(1, GLOO + " 1", 100.5))
    assert root_cause(job, status=tmp_path) == f"worker rank 1 failed (exit code 1): {GLOO} 1"
