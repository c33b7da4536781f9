"""Jobs started by torchrun or srun, not by onegpu, lease their devices in the pool's ledger when they call
onegpu.init() or prepare: one process per machine leases them, so that onegpu smi and usage see the job."""

import getpass
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT
from typer.testing import CliRunner

from onegpu.cli import app
from onegpu.launch.environment import current_environment
from onegpu.launch.external import external_job_name, lease_for_external_job, release_external_lease
from onegpu.pool.config import load_pool
from onegpu.pool.lease import leased_devices, pool_ledger

USER = getpass.getuser()
RUN_ID = "fc0dc1fe-07e8-44c5-91a0-e61d0611fa42"  # as torchrun --standalone makes one


def torchrun(*, rank: int = 0, local_rank: int = 0, local_world: int = 2, **extra: str) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world),
            "MASTER_ADDR": "node7", "MASTER_PORT": "29400", **extra}  # fmt: skip


def srun(*, proc: int = 0, local: int = 0, per_node: str = "2", **extra: str) -> dict[str, str]:
    return {"SLURM_PROCID": str(proc), "SLURM_NTASKS": "4", "SLURM_LOCALID": str(local),
            "SLURM_NTASKS_PER_NODE": per_node, "SLURM_JOB_ID": "4242", **extra}  # fmt: skip


@pytest.mark.parametrize(
    ("variables", "name"),
    [
        (torchrun(TORCHELASTIC_RUN_ID=RUN_ID), f"{USER}-torchrun-fc0dc1fe"),
        (torchrun(rank=3, local_rank=1, TORCHELASTIC_RUN_ID=RUN_ID), f"{USER}-torchrun-fc0dc1fe"),
        (torchrun(TORCHELASTIC_RUN_ID="bert/large"), f"{USER}-torchrun-bert_large"),
        (torchrun(TORCHELASTIC_RUN_ID="none"), f"{USER}-torchrun-node7-29400-{os.getppid()}"),
        (srun(SLURM_STEP_ID="3"), f"{USER}-slurm-4242.3"),
        (srun(proc=3, local=1, per_node="2(x2)"), f"{USER}-slurm-4242"),
        ({}, None),  # plain `python train.py`: one process, not a pool job
    ],
)
def test_every_rank_of_one_launch_names_the_job_alike(variables, name):
    assert external_job_name(current_environment(variables), variables) == name


def test_workers_of_onegpu_run_take_no_second_lease(monkeypatch):
    monkeypatch.setenv("ONEGPU_LAUNCHED", "1")  # their launcher leased their devices
    variables = torchrun(TORCHELASTIC_RUN_ID=RUN_ID)
    assert external_job_name(current_environment(variables), variables) is None
    assert lease_for_external_job(current_environment(variables), variables) is None


@pytest.fixture
def pool(tmp_path, monkeypatch):
    """A pool of 2 CPU slots of its own, with a lease lifetime of 3 s; no external lease left after the test."""
    (tmp_path / "pool.toml").write_text("cpu_slots = 2\nslot_memory_gb = 1\n")
    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path))
    monkeypatch.setenv("ONEGPU_LEASE_TTL", "3")
    monkeypatch.delenv("ONEGPU_DATABASE_URL", raising=False)
    yield tmp_path
    release_external_lease()


def held(job: str | None = None) -> list[tuple[str, str, tuple[int, ...], str, int]]:
    holdings = pool_ledger(load_pool()).holdings()
    return [(h.job, h.user, h.devices, h.host, h.pid) for h in holdings if job is None or h.job == job]


def test_local_rank_0_leases_its_machines_devices_until_released(pool):
    variables = srun(SLURM_STEP_ID="0")
    assert lease_for_external_job(current_environment(srun(proc=1, local=1)), variables) is None  # the other local rank
    lease = lease_for_external_job(current_environment(variables), variables)
    assert (lease.job, lease.devices) == (f"{USER}-slurm-4242.0", (0, 1))
    assert held() == [(f"{USER}-slurm-4242.0", USER, (0, 1), socket.gethostname(), os.getpid())]
    assert lease_for_external_job(current_environment(variables), variables) is None  # once per process
    time.sleep(1.5)  # past half the lease's lifetime: renewed, not expired
    assert len(held()) == 1
    release_external_lease()
    assert held() == []
    billed = [(i.job, i.device) for i in pool_ledger(load_pool()).intervals()]
    assert billed == [(f"{USER}-slurm-4242.0", 0), (f"{USER}-slurm-4242.0", 1)]


def test_a_job_waits_in_line_while_the_pool_is_held(pool, capfd):
    variables = torchrun(TORCHELASTIC_RUN_ID=RUN_ID)
    taken = []
    with leased_devices(count=2) as other:
        waiter = threading.Thread(
            target=lambda: taken.append(lease_for_external_job(current_environment(variables), variables))
        )
        waiter.start()
        deadline = time.monotonic() + 10
        while "waiting" not in (seen := capfd.readouterr().err) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert seen.strip() == f"onegpu: waiting for 2 devices: 0 of 2 free, held by {other.job}"
        assert taken == []
    waiter.join(timeout=10)
    assert [(lease.job, lease.devices) for lease in taken] == [(f"{USER}-torchrun-fc0dc1fe", (0, 1))]


def test_a_job_larger_than_the_pool_runs_without_a_lease(pool, capfd):
    variables = torchrun(local_world=3, TORCHELASTIC_RUN_ID=RUN_ID)
    assert lease_for_external_job(current_environment(variables), variables) is None
    assert capfd.readouterr().err == (
        f"onegpu: warning: job {USER}-torchrun-fc0dc1fe runs without a device lease: its 3 workers on this machine "
        f"are more than the 2 devices of its pool ({pool / 'pool.toml'}); onegpu smi and usage do not see it\n"
    )
    assert held() == []


@pytest.mark.parametrize(
    ("setting", "value", "why"),
    [
        ("ONEGPU_HOME", "{file}", "ONEGPU_HOME={file} is a file, not a directory: point ONEGPU_HOME at"),
        ("ONEGPU_DATABASE_URL", "mysql://db/x", "ONEGPU_DATABASE_URL 'mysql://db/x' is neither sqlite:///PATH"),
    ],
)
def test_a_ledger_that_cannot_be_used_costs_one_warning(pool, capfd, monkeypatch, setting, value, why):
    (pool / "a-file").write_text("")
    monkeypatch.setenv(setting, value.format(file=pool / "a-file"))
    variables = srun()
    assert lease_for_external_job(current_environment(variables), variables) is None
    warning = capfd.readouterr().err
    assert warning.startswith(f"onegpu: warning: job {USER}-slurm-4242 runs without a device lease (")
    assert why.format(file=pool / "a-file") in warning and warning.count("\n") == 1


@pytest.mark.slow
def test_a_restarted_job_takes_over_the_leases_its_killed_process_left(pool):
    job = f"{USER}-slurm-4242"
    killed = subprocess.run(  # a first attempt killed without exiting: its leases stay until they expire
        [sys.executable, "-c", "import os\nfrom onegpu.pool.lease import leased_devices\n"
         f"with leased_devices(count=2, job={job!r}):\n    os.kill(os.getpid(), 9)"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
    )  # fmt: skip
    assert killed.returncode == -9 and [h[0] for h in held()] == [job]
    start = time.monotonic()
    lease = lease_for_external_job(current_environment(srun()), srun())
    assert (lease.job, lease.devices) == (job, (0, 1)) and time.monotonic() - start < 2  # not the 3 s expiry
    assert held() == [(job, USER, (0, 1), socket.gethostname(), os.getpid())]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def job_environment(home) -> dict[str, str]:
    """The test's environment for a job another launcher starts: the pool of ``home``, none of onegpu run's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEGPU_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    return {**env, "ONEGPU_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "ONEGPU_MEASURE_COMPILE": "0"}  # fmt: skip


def check_leased_then_billed(home, *, job: str) -> None:
    """While the job ran, its rank 0 saw ``onegpu smi`` show 2 devices held by the job (leased by rank 0 itself,
    the first process of the machine); now the leases are gone and ``onegpu usage`` bills their minutes."""
    smi = json.loads((home / "rank0.json").read_text())["smi"]
    jobs = [{k: v for k, v in held.items() if k not in ("since", "history")} for held in smi["jobs"]]
    assert all(isinstance(held["history"], list) for held in smi["jobs"])  # the job's samples so far
    rank0 = json.loads((home / "rank0.json").read_text())["pid"]
    assert jobs == [{"job": job, "user": USER, "devices": [0, 1], "host": socket.gethostname(), "pid": rank0}]
    assert [device["job"] for device in smi["devices"]] == [job, job]
    assert held() == []
    usage = CliRunner().invoke(app, ["usage", "--json", "--by", "job"])
    assert usage.exit_code == 0, usage.output
    assert json.loads(usage.stdout)["rows"] == [{"job": job, "device_minutes": 2, "cost": 0.0}]


@pytest.mark.slow
def test_a_torchrun_job_is_leased_while_it_runs_and_billed_after(pool):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "tests/scripts/external_job.py", str(pool), "init"],
        cwd=ROOT, env=job_environment(pool), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_id = json.loads((pool / "rank0.json").read_text())["run_id"]
    check_leased_then_billed(pool, job=f"{USER}-torchrun-{run_id[:8]}")


@pytest.mark.slow
def test_an_srun_job_is_leased_while_it_runs_and_billed_after(pool):
    """srun's tasks, emulated: 2 processes with the variables srun gives one task per device."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    tasks = [
        subprocess.Popen(
            [sys.executable, "tests/scripts/external_job.py", str(pool), "prepare"],
            cwd=ROOT,
            env={**job_environment(pool), **slurm, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for task in range(2)
    ]
    for task in tasks:
        _, err = task.communicate(timeout=120)
        assert task.returncode == 0, err
    check_leased_then_billed(pool, job=f"{USER}-slurm-4242.0")


@pytest.mark.slow
def test_a_lease_that_cannot_be_renewed_lapses_and_the_job_runs_on(pool, capfd):
    lease = lease_for_external_job(current_environment(srun()), srun())
    for path in pool.glob("ledger.sqlite*"):  # the ledger deleted under the running job
        path.unlink()
    deadline = time.monotonic() + 10
    while "lapse" not in (seen := capfd.readouterr().err) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert seen.splitlines()[-1] == (
        f"onegpu: warning: the job's device leases could not be renewed (the ledger {pool / 'ledger.sqlite'} was "
        "deleted or emptied while in use (no such table: leases): the next command starts a new one; restore it "
        "from a backup to keep the usage it held): they lapse; the job runs on, unseen by onegpu smi"
    )
    release_external_lease()  # at exit: the usage it cannot record is named
    assert capfd.readouterr().err.startswith(f"onegpu: warning: the usage of job {lease.job} (devices 0,1 for ")
