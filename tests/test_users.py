"""Several users on one pool: each job's OS user is recorded, ``onegpu jobs`` lists who runs and who waits,
``onegpu cancel`` stops your own jobs (anyone's for an administrator), and on PostgreSQL each user's role
cannot rewrite another user's rows (docs/postgres-roles.md, run on a real server)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from bad_input import processes_of
from conftest import ROOT, run_onegpu
from typer.testing import CliRunner

from onegpu.cli import app
from onegpu.pool.lease import leased_devices
from onegpu.pool.ledger import LedgerError, open_ledger

ADMINS_HINT = "an administrator may cancel any (add your user name to admins = [...] in {home}/pool.toml)"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A pool of 4 CPU slots of 6 GB shared by alice, bob and carol; carol administers it."""
    (tmp_path / "pool.toml").write_text('cpu_slots = 4\nslot_memory_gb = 6\nadmins = ["carol"]\n')
    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path))
    monkeypatch.setenv("ONEGPU_LEASE_TTL", "30")
    monkeypatch.delenv("ONEGPU_DATABASE_URL", raising=False)
    return tmp_path


def be(monkeypatch, user: str) -> None:
    """Play ``user``: getpass.getuser() reads LOGNAME first, then USER."""
    monkeypatch.setenv("LOGNAME", user)
    monkeypatch.setenv("USER", user)


def onegpu(*args: str):
    return CliRunner().invoke(app, list(args))


def ledger(home: Path, ttl_s: float = 30):
    return open_ledger(url=os.environ.get("ONEGPU_DATABASE_URL"), home=home, ttl_s=ttl_s)


def wait_in_line(records, *, job: str, devices: int) -> dict:
    """``job`` waiting for ``devices`` in a thread of its own (as the current user); its outcome, once it ends,
    under "served" or "error"."""
    outcome: dict = {}
    user = os.environ["LOGNAME"]

    def wait() -> None:
        try:
            records.acquire(job=job, devices=devices, pool_devices=range(4), poll_s=0.05, user=user)
            outcome["served"] = True
        except LedgerError as error:
            outcome["error"] = str(error)

    outcome["thread"] = threading.Thread(target=wait, daemon=True)
    outcome["thread"].start()
    deadline = time.time() + 10
    while job not in [w.job for w in records.waiting()] and time.time() < deadline:
        time.sleep(0.02)
    return outcome


def test_an_empty_pool_says_so_in_one_line(home):
    result = onegpu("jobs")
    assert result.exit_code == 0 and result.stdout == "onegpu: no job runs or waits in this pool\n"
    assert json.loads(onegpu("jobs", "--json").stdout) == {"running": [], "waiting": []}


def test_jobs_lists_who_runs_and_who_waits_in_line_with_flavors_and_positions(home, monkeypatch):
    records = ledger(home)
    be(monkeypatch, "alice")
    records.acquire(job="alice-1", devices=3, pool_devices=range(4))  # the user comes from the OS, as onegpu run's
    be(monkeypatch, "bob")
    bob = wait_in_line(records, job="bob-1", devices=2)
    be(monkeypatch, "carol")
    carol = wait_in_line(records, job="carol-1", devices=4)

    report = json.loads(onegpu("jobs", "--json").stdout)
    assert [(j["job"], j["user"], j["devices"], j["flavor"]) for j in report["running"]] == [
        ("alice-1", "alice", [0, 1, 2], "3 devices")  # no flavor of 3 devices
    ]
    assert [(j["position"], j["job"], j["user"], j["devices"], j["flavor"]) for j in report["waiting"]] == [
        (1, "bob-1", "bob", 2, "Medium.12GB"),
        (2, "carol-1", "carol", 4, "Large.24GB"),
    ]
    assert report["running"][0]["pid"] == os.getpid() and report["running"][0]["minutes"] < 1
    text = onegpu("jobs").stdout.splitlines()
    assert text[0] == "running:" and text[2].split()[:4] == ["alice-1", "alice", "0,1,2", "3"]
    assert text[3].startswith("waiting") and text[5].split()[:5] == ["1", "bob-1", "bob", "2", "devices"]
    assert text[6].split()[:3] == ["2", "carol-1", "carol"]

    records.release(job="alice-1")
    bob["thread"].join(timeout=10)
    assert bob.get("served") and [w.job for w in records.waiting()] == ["carol-1"]
    records.cancel(job="carol-1", by_user="carol", allowed=lambda owner: None)
    carol["thread"].join(timeout=10)
    records.release(job="bob-1")
    assert {(i.job, i.user) for i in records.intervals()} == {("alice-1", "alice"), ("bob-1", "bob")}


def test_a_user_cancels_their_own_waiting_job_and_it_leaves_the_line_saying_by_whom(home, monkeypatch):
    records = ledger(home)
    be(monkeypatch, "alice")
    records.acquire(job="alice-1", devices=4, pool_devices=range(4))
    be(monkeypatch, "bob")
    bob = wait_in_line(records, job="bob-1", devices=1)
    result = onegpu("cancel", "bob-1")
    assert (
        result.exit_code == 0 and result.stdout == "onegpu: job bob-1 cancelled; it leaves the line within a second\n"
    )
    bob["thread"].join(timeout=10)
    assert bob["error"] == "job bob-1 was cancelled by bob with onegpu cancel while it waited in line"
    assert records.waiting() == [] and [h.job for h in records.holdings()] == ["alice-1"]
    again = onegpu("cancel", "bob-1")
    assert again.exit_code == 1 and again.stderr == "onegpu: job bob-1 already ended (cancelled by bob)\n"
    records.release(job="alice-1")


def test_another_users_job_is_refused_unless_you_administer_the_pool(home, monkeypatch):
    records = ledger(home)
    be(monkeypatch, "alice")
    records.acquire(job="alice-1", devices=2, pool_devices=range(4))
    be(monkeypatch, "bob")
    refused = onegpu("cancel", "alice-1")
    assert refused.exit_code == 1
    assert refused.stderr == (
        f"onegpu: job alice-1 belongs to alice: you (bob) may cancel only your own jobs; {ADMINS_HINT}\n".format(
            home=home
        )
    )
    assert records.cancelled_by(job="alice-1") is None

    be(monkeypatch, "carol")  # in pool.toml's admins
    result = onegpu("cancel", "alice-1")
    assert result.exit_code == 0
    assert result.stdout == "onegpu: job alice-1 cancelled; its workers stop and its devices are released within 5 s\n"
    assert records.cancelled_by(job="alice-1") == "carol"
    again = onegpu("cancel", "alice-1")
    assert again.stdout == "onegpu: job alice-1 was already cancelled by carol; it stops within 5 s\n"
    records.release(job="alice-1")
    ended = onegpu("cancel", "alice-1")
    assert ended.exit_code == 1 and ended.stderr == "onegpu: job alice-1 already ended (cancelled by carol)\n"


def test_cancelling_an_unknown_or_ended_job_says_what_runs(home, monkeypatch):
    records = ledger(home)
    be(monkeypatch, "alice")
    records.acquire(job="alice-old", devices=1, pool_devices=range(4))
    records.release(job="alice-old")
    records.acquire(job="alice-1", devices=1, pool_devices=range(4))
    ended = onegpu("cancel", "alice-old")
    assert ended.exit_code == 1 and ended.stderr == "onegpu: job alice-old already ended\n"
    unknown = onegpu("cancel", "alice-2")
    assert unknown.exit_code == 1
    assert (
        unknown.stderr
        == "onegpu: no job 'alice-2' runs or waits in this pool: onegpu jobs shows alice-1 (alice, running)\n"
    )
    records.release(job="alice-1")


def test_a_running_job_sees_its_cancel_at_its_next_renewal_and_keeps_its_usage(home, monkeypatch):
    monkeypatch.setenv("ONEGPU_LEASE_TTL", "0.6")  # a renewal every 0.1 s
    be(monkeypatch, "alice")
    reasons: list[str] = []
    with leased_devices(count=2, wait=False, on_lost=reasons.append) as lease:
        assert onegpu("cancel", lease.job).exit_code == 0
        recorded = time.time()
        while not reasons and time.time() < recorded + 5:
            time.sleep(0.01)
        noticed = time.time()
        time.sleep(0.3)  # the leases stay renewed until released, and the job is told once
    assert reasons == [f"job {lease.job} was cancelled by alice with onegpu cancel"]
    assert noticed - recorded < 1, "within a renewal (0.1 s), give or take a busy machine"
    records = ledger(home)
    assert records.holdings() == []
    assert sorted(i.device for i in records.intervals() if i.user == "alice") == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("when", ["while-starting", "while-running"])
def test_onegpu_run_cancelled_from_another_process_stops_its_workers_and_keeps_its_usage(home, tmp_path, when):
    """Cancelled by an administrator (carol) as soon as it holds its device (before its worker runs, most
    often), or once its worker runs (through the real CLI, from another process)."""
    script, tag = tmp_path / "job.py", f"cancelled-{uuid.uuid4().hex[:8]}"
    script.write_text("import time\nprint('started', flush=True)\nwhile True:\n    time.sleep(0.1)\n")
    env = {**os.environ, "ONEGPU_LEASE_TTL": "3", "LOGNAME": "alice", "USER": "alice", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        [sys.executable, "-m", "onegpu", "run", "--workers", "1", str(script), tag],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    records = ledger(home)
    try:
        while not records.holdings() and job.poll() is None:
            time.sleep(0.01)
        (name,) = [h.job for h in records.holdings()]
        cancelled = time.time()
        if when == "while-starting":
            records.cancel(job=name, by_user="carol", allowed=lambda owner: None)
        else:
            assert job.stdout.readline().strip() == "started"
            cancelled = time.time()
            result = run_onegpu("cancel", name, env={"LOGNAME": "carol", "USER": "carol", "ONEGPU_LEASE_TTL": "3"})
            assert result.returncode == 0 and "cancelled" in result.stdout
        recorded = time.time()
        assert job.wait(timeout=30) == 1
        ended = time.time()
    finally:
        job.kill()
    assert job.stderr.read().strip().splitlines()[-1] == f"onegpu: job {name} was cancelled by carol with onegpu cancel"
    assert ended - recorded < 0.5 + 5, "noticed within one renewal (0.5 s), then the workers stopped"
    assert processes_of(tag) == []
    assert records.holdings() == [] and records.waiting() == []
    (interval,) = [i for i in records.intervals() if i.job == name]
    assert interval.user == "alice" and cancelled < interval.end < ended


# --- PostgreSQL: one role per user (docs/postgres-roles.md) ------------------------------------------------

STALE_S = 1  # the SQL's 15 (half of lease_ttl_s = 30) for these ledgers' lease_ttl_s of 2


@pytest.fixture(scope="module")
def roles_server(tmp_path_factory):
    """A PostgreSQL server of this module's own, with a database whose tables its owner created and secured
    with the SQL of docs/postgres-roles.md; the URL of each role."""
    pgserver = pytest.importorskip("pgserver")
    psycopg = pytest.importorskip("psycopg")
    server = pgserver.get_server(tmp_path_factory.mktemp("roles"), cleanup_mode="stop")
    owner = server.get_uri()
    with psycopg.connect(owner, autocommit=True) as connection:
        connection.execute("CREATE DATABASE onegpu")
    url = lambda role: re.sub(r"//[^@]*@/postgres", f"//{role}@/onegpu", owner)
    open_ledger(url=url("postgres"), home=tmp_path_factory.mktemp("unused"), ttl_s=2)  # the owner creates the tables
    sql = re.search(r"```sql\n(.*?)```", (ROOT / "docs" / "postgres-roles.md").read_text(), re.S).group(1)
    assert " - 15 $$" in sql
    with psycopg.connect(url("postgres"), autocommit=True) as connection:
        connection.execute(sql.replace(" - 15 $$", f" - {STALE_S} $$"))
    yield url


def sql(url: str, statement: str, *values) -> int:
    """Run one statement as the URL's role; the number of rows it changed."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        return connection.execute(statement, values).rowcount


@pytest.mark.slow
def test_each_user_role_keeps_the_ledger_working_but_cannot_touch_others_rows(roles_server, tmp_path, monkeypatch):
    import psycopg

    alice, bob = (open_ledger(url=roles_server(user), home=tmp_path, ttl_s=2) for user in ("alice", "bob"))
    be(monkeypatch, "alice")
    alice.acquire(job="alice-1", devices=2, pool_devices=range(4))
    alice.renew(job="alice-1")
    alice.release(job="alice-1")
    alice.acquire(job="alice-2", devices=1, pool_devices=range(4))
    be(monkeypatch, "bob")
    assert bob.acquire(job="bob-1", devices=1, pool_devices=range(4)) == (1,)
    assert [h.user for h in bob.holdings()] == ["alice", "bob"]

    as_bob = roles_server("bob")
    for statement in ("UPDATE intervals SET ended = started", "DELETE FROM intervals"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # usage is never rewritten, not even one's own
            sql(as_bob, statement)
    assert sql(as_bob, "UPDATE leases SET renewed = 0 WHERE job = 'alice-2'") == 0  # a live lease of alice's
    assert sql(as_bob, "DELETE FROM leases WHERE job = 'alice-2'") == 0
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # usage billed to alice, out of nothing
        sql(as_bob, "INSERT INTO intervals VALUES ('alice-9', 'alice', 3, 0, 3600)")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # a lease in alice's name
        sql(as_bob, "INSERT INTO leases VALUES (3, 'alice-9', 'alice', 'h', 1, 0, 0)")
    with pytest.raises(LedgerError, match="row-level security"):  # cancelling alice's job through the database
        bob.cancel(job="alice-2", by_user="bob", allowed=lambda owner: None)
    be(monkeypatch, "alice")  # an administrator (onegpu_admins) may
    assert alice.cancel(job="bob-1", by_user="alice", allowed=lambda owner: None).state == "running"

    be(monkeypatch, "bob")
    with pytest.raises(LedgerError, match="row-level security"):  # ending alice's live job, as if it were bob's
        bob.release(job="alice-2")
    time.sleep(2.2)  # alice-2 and bob-1 stop renewing: bob's next look ends both and records their usage
    with psycopg.connect(as_bob) as connection:
        (lease,) = connection.execute("SELECT started, renewed FROM leases WHERE job = 'alice-2'").fetchall()
    mirror = "INSERT INTO intervals VALUES ('alice-2', 'alice', 0, %s, %s)"
    assert sql(as_bob, mirror, *lease) == 1  # what the expiry records (alice's usage up to her last renewal) ...
    with pytest.raises(psycopg.errors.UniqueViolation):  # ... once
        sql(as_bob, mirror, *lease)
    bob.acquire(job="bob-2", devices=4, pool_devices=range(4), wait=False)
    assert {(i.job, i.user) for i in bob.intervals() if i.job != "bob-2"} == {
        ("alice-1", "alice"), ("alice-1", "alice"), ("alice-2", "alice"), ("bob-1", "bob")
    }  # fmt: skip
    assert len([i for i in bob.intervals() if i.job == "alice-2"]) == 1
    bob.release(job="bob-2")

    be(monkeypatch, "mallory")  # connecting as bob's role under another OS user: refused in one line
    with pytest.raises(LedgerError, match=r"connect as the database role named as your OS user \(mallory\)"):
        bob.acquire(job="mallory-1", devices=1, pool_devices=range(4))
