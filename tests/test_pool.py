"""The virtual accelerator: flavors, leases on a shared pool, usage accounting, and their commands."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, run_onegpu

from onegpu.errors import UsageError
from onegpu.pool.config import load_pool
from onegpu.pool.flavors import all_flavors, current_flavor, standard_name, standard_sizes, switch_flavor
from onegpu.pool.ledger import HISTORY_S, open_ledger

pytestmark = pytest.mark.slow  # the real CLI, in processes of its own


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A pool of 4 CPU slots of 6 GB, at 3.0 per device-hour, with a 2 s lease lifetime."""
    (tmp_path / "pool.toml").write_text("cpu_slots = 4\nslot_memory_gb = 6\nprice_per_device_hour = 3.0\n")
    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path))
    monkeypatch.setenv("ONEGPU_LEASE_TTL", "2")
    return tmp_path


def cli(home, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_onegpu(*args, env={"ONEGPU_HOME": str(home), "ONEGPU_LEASE_TTL": "2", **(env or {})})


def ledger(home):
    return open_ledger(url=os.environ.get("ONEGPU_DATABASE_URL"), home=home, ttl_s=2)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A PostgreSQL server of the tests' own (the pgserver wheel bundles one)."""
    pgserver = pytest.importorskip("pgserver")
    server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    yield server.get_uri()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, home, monkeypatch):
    """The ledger on SQLite (the default), or on PostgreSQL through ONEGPU_DATABASE_URL, emptied first."""
    if request.param == "postgresql":
        monkeypatch.setenv("ONEGPU_DATABASE_URL", request.getfixturevalue("postgres_url"))
    remove_ledger(home)
    return request.param


def remove_ledger(home):
    """No ledger at all: its SQLite file, or its PostgreSQL tables, gone."""
    url = os.environ.get("ONEGPU_DATABASE_URL")
    if url:
        import psycopg

        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("DROP TABLE IF EXISTS leases, intervals, queue, stats, cancels, samples")
    for path in home.glob("ledger.sqlite*"):
        path.unlink()


def test_flavors_are_named_as_users_expect():
    assert [(n, standard_name(n)) for n in standard_sizes(16)] == [
        (1, "Small"),
        (2, "Medium"),
        (4, "Large"),
        (8, "xLarge"),
        (12, "1.5xLarge"),
        (16, "2xLarge"),
    ]


def test_only_flavors_the_pool_serves_are_offered_and_the_choice_persists_per_user(home, monkeypatch):
    pool = load_pool()
    assert [f.name for f in all_flavors(pool)] == ["Small.6GB", "Medium.12GB", "Large.24GB"]
    assert current_flavor(pool).name == "Medium.12GB"  # 2 workers on CPU slots until one is chosen
    switch_flavor(pool, "large")
    assert current_flavor(load_pool()).name == "Large.24GB"
    with monkeypatch.context() as other:  # another user of the same home keeps their own
        other.setenv("LOGNAME", "someone-else")
        assert current_flavor(load_pool()).name == "Medium.12GB"
    assert current_flavor(load_pool()).name == "Large.24GB"
    with pytest.raises(
        UsageError, match="^xLarge needs 8 devices and this pool has 4: choose one of Small.6GB, Medium"
    ):
        switch_flavor(pool, "xLarge")
    with pytest.raises(
        UsageError, match="^no flavor 'Jumbo' on this pool: choose one of Small.6GB, Medium.12GB, Large"
    ):
        switch_flavor(pool, "Jumbo")


def test_flavors_can_be_overridden_in_the_pool_file(home):
    (home / "pool.toml").write_text("cpu_slots = 4\nslot_memory_gb = 6\n[flavors]\nTiny = 1\nTriple = 3\nHuge = 9\n")
    assert [f.name for f in all_flavors(load_pool())] == ["Tiny.6GB", "Triple.18GB"]  # Huge: more than the pool


def test_a_bad_pool_file_names_the_key(home):
    (home / "pool.toml").write_text("cpu_slot = 4\n")
    with pytest.raises(UsageError, match="unknown key 'cpu_slot'"):
        load_pool()


def open_together(home, count):
    """The errors of ``count`` threads opening the ledger at the same instant."""
    start, failures = threading.Barrier(count), []

    def open_it():
        start.wait()
        try:
            ledger(home)
        except Exception as exc:
            failures.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def test_jobs_starting_together_on_a_new_ledger_all_open_it(home, backend):
    """The first jobs of a pool create its tables; 8 at once must not collide doing so."""
    for _ in range(10):
        remove_ledger(home)
        assert open_together(home, 8) == []


def test_concurrent_jobs_never_share_a_device_and_leave_nothing_held(home, backend):
    """8 processes, each twice leasing 1 or 2 of the 4 devices at once for a moment."""
    script = (
        "import sys, time\n"
        "from onegpu.pool.lease import leased_devices\n"
        "for _ in range(2):\n"
        "    with leased_devices(count=int(sys.argv[1])):\n"
        "        time.sleep(0.2)\n"
    )
    jobs = [
        subprocess.Popen([sys.executable, "-c", script, str(1 + i % 2)], env={**os.environ}, cwd=ROOT) for i in range(8)
    ]
    assert all(job.wait(timeout=120) == 0 for job in jobs)
    records = ledger(home)
    assert records.holdings() == []
    intervals = records.intervals()
    assert len({i.job for i in intervals}) == 16 and len(intervals) == 24
    for device in range(4):
        spans = sorted((i.start, i.end) for i in intervals if i.device == device)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans


def test_leases_of_a_killed_job_expire_and_its_usage_is_kept(home, backend):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom onegpu.pool.lease import leased_devices\n"
            "with leased_devices(count=4):\n    time.sleep(120)\n",
        ],  # fmt: skip
        env={**os.environ},
        cwd=ROOT,
    )
    records = ledger(home)
    deadline = time.time() + 60
    while not records.holdings() and time.time() < deadline:
        time.sleep(0.2)
    assert records.holdings()[0].devices == (0, 1, 2, 3)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    killed = time.time()
    devices = records.acquire(job="next", devices=4, pool_devices=range(4))  # waits until the dead job's leases expire
    assert devices == (0, 1, 2, 3) and time.time() - killed < 2 + 2
    dead = [i for i in records.intervals() if i.job != "next"]
    assert len(dead) == 4 and all(i.end <= killed for i in dead)  # ended at its last renewal


def test_waiting_jobs_are_served_first_come_first_served(home, backend):
    records = ledger(home)
    records.acquire(job="big", devices=3, pool_devices=range(4))
    served: list[str] = []

    def wait_for(job: str, count: int) -> None:
        records.acquire(job=job, devices=count, pool_devices=range(4), poll_s=0.05)
        served.append(job)

    first = threading.Thread(target=wait_for, args=("first", 2))
    first.start()
    time.sleep(0.3)
    second = threading.Thread(target=wait_for, args=("second", 1))  # one device is free, but "first" is ahead
    second.start()
    time.sleep(0.5)
    assert served == []
    records.release(job="big")
    first.join(timeout=10)
    second.join(timeout=10)
    assert served == ["first", "second"]


def test_usage_bills_each_device_per_started_minute(home):
    records = ledger(home)
    connection = sqlite3.connect(home / "ledger.sqlite")
    day, midnight = 1_700_000_000.0, 1_700_006_400.0  # 2023-11-14 22:13:20 UTC, and the midnight after it
    rows = [("a", "ann", 0, day, day + 30), ("a", "ann", 1, day, day + 30), ("b", "bob", 2, day, day + 61)]
    rows.append(("c", "cat", 3, midnight - 90, midnight + 150))  # minutes begin at -90, -30 | +30, +90
    connection.executemany("INSERT INTO intervals VALUES (?, ?, ?, ?, ?)", rows)
    connection.commit()
    connection.close()
    assert [i.billed_minutes for i in records.intervals()] == [1, 1, 2, 4]
    by_job = json.loads(cli(home, "usage", "--json").stdout)
    assert {r["job"]: r["device_minutes"] for r in by_job["rows"]} == {"a": 2, "b": 2, "c": 4}
    assert by_job["total_device_minutes"] == 8 and by_job["total_cost"] == pytest.approx(8 / 60 * 3.0)
    by_day = json.loads(cli(home, "usage", "--json", "--by", "day").stdout)
    assert by_day["rows"] == [
        {"day": "2023-11-14", "device_minutes": 6, "cost": pytest.approx(0.3)},
        {"day": "2023-11-15", "device_minutes": 2, "cost": pytest.approx(0.1)},
    ]
    after_midnight = json.loads(cli(home, "usage", "--json", "--since", "2023-11-15").stdout)
    assert after_midnight["rows"] == [{"job": "c", "device_minutes": 2, "cost": pytest.approx(0.1)}]
    later = json.loads(cli(home, "usage", "--json", "--since", "2024-01-01").stdout)
    assert later["total_device_minutes"] == 0
    text = cli(home, "usage", "--by", "user").stdout
    assert "ann" in text and "bob" in text and "total" in text
    wrong = cli(home, "usage", "--by", "month")
    assert (
        wrong.returncode == 1
        and wrong.stderr.strip() == "onegpu: --by 'month': group by one of job, user, day, interval"
    )


def test_smi_shows_the_virtual_device_and_the_jobs_behind_it(home):
    records = ledger(home)
    records.acquire(job="train", devices=2, pool_devices=range(4))
    for device in (0, 1):
        records.report(job="train", device=device, memory_bytes=1.5e9, utilization=0.8)
    alive = {"ONEGPU_LEASE_TTL": "600"}  # nothing renews these leases: keep them valid while smi starts
    report = json.loads(cli(home, "smi", "--json", env=alive).stdout)
    virtual = report["virtual_device"]
    assert virtual["model"] == "Medium.12GB" and virtual["memory_total_gb"] == 12
    assert virtual["memory_used_gb"] == 3.0 and virtual["utilization"] == 0.8  # live sums over its devices
    assert [d["job"] for d in report["devices"]] == ["train", "train", None, None]
    assert report["jobs"][0]["devices"] == [0, 1]
    table = cli(home, "smi", env=alive).stdout
    assert "onegpu Virtual Device" in table and "Medium.12GB" in table and "3.0 GB" in table and "train" in table


def test_switch_menu_in_a_terminal(home):
    import pty

    def menu(answer: str) -> str:
        leader, follower = pty.openpty()
        process = subprocess.Popen(
            [sys.executable, "-m", "onegpu", "switch"],
            stdin=follower,
            stdout=follower,
            stderr=follower,
            cwd=ROOT,
            env={**os.environ},
        )
        os.close(follower)
        output, deadline = b"", time.time() + 60
        while b"q to quit" not in output and time.time() < deadline:
            output += os.read(leader, 4096)
        os.write(leader, answer.encode() + b"\n")
        process.wait(timeout=60)
        try:
            while chunk := os.read(leader, 4096):
                output += chunk
        except OSError:
            pass
        os.close(leader)
        return output.decode()

    shown = menu("3")
    assert "* 2) Medium.12GB" in shown and "3) Large.24GB" in shown
    assert "now Large.24GB" in shown and current_flavor(load_pool()).name == "Large.24GB"
    assert "* 3) Large.24GB" in menu("q") and current_flavor(load_pool()).name == "Large.24GB"


def test_the_flavor_decides_the_worker_count_and_run_accounts_for_it(home, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import os\nprint('workers', os.environ['WORLD_SIZE'], 'devices', os.environ['ONEGPU_DEVICES'])\n"
    )
    assert cli(home, "switch", "Small").returncode == 0
    result = cli(home, "run", str(script))
    assert result.returncode == 0, result.stderr
    assert "workers 1 devices 0" in result.stdout
    assert [(i.device, i.billed_minutes) for i in ledger(home).intervals()] == [(0, 1)]
    too_big = cli(home, "run", "--workers", "5", str(script))
    assert too_big.returncode == 1
    assert too_big.stderr.strip().splitlines()[-1] == (
        "onegpu: 5 devices: this pool has 4; the largest flavor is Large.24GB (4 devices)"
    )


def test_ctrl_c_stops_the_job_and_releases_its_devices(home, tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "onegpu", "run", "--workers", "2", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ},
    )
    assert launcher.stdout.readline().strip() == "started"
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=60) == 1
    records = open_ledger(url=None, home=home, ttl_s=600)  # nothing may be left to expire
    assert records.holdings() == []
    assert sorted(i.device for i in records.intervals()) == [0, 1]


def test_no_wait_fails_at_once_when_the_pool_is_taken(home, tmp_path):
    ledger(home).acquire(job="other", devices=4, pool_devices=range(4))
    script = tmp_path / "job.py"
    script.write_text("print('ran')\n")
    result = cli(home, "run", "--no-wait", str(script), env={"ONEGPU_LEASE_TTL": "600"})  # "other" stays alive
    assert result.returncode == 1 and "ran" not in result.stdout
    assert "the pool cannot serve 2 devices now" in result.stderr and "held by other" in result.stderr
    held = open_ledger(url=None, home=home, ttl_s=600).holdings()
    assert [h.job for h in held] == ["other"]  # nothing of the refused job is left, not even in line
    assert sqlite3.connect(home / "ledger.sqlite").execute("SELECT COUNT(*) FROM queue").fetchone() == (0,)


def test_a_corrupt_or_locked_ledger_is_a_clear_error_and_loses_nothing(home):
    records = ledger(home)
    records.acquire(job="kept", devices=1, pool_devices=range(4))
    records.release(job="kept")
    connection = sqlite3.connect(home / "ledger.sqlite", isolation_level=None)
    connection.execute("BEGIN EXCLUSIVE")
    locked = cli(home, "usage", env={"ONEGPU_LEDGER_BUSY_S": "0.5"})
    connection.execute("ROLLBACK")
    connection.close()
    assert locked.returncode == 1 and "stayed locked by another process" in locked.stderr
    assert len(locked.stderr.strip().splitlines()) == 1
    assert [i.job for i in ledger(home).intervals()] == ["kept"]  # still recorded

    broken = home / "broken"
    broken.mkdir()
    (broken / "ledger.sqlite").write_bytes(b"this is not a database" * 100)
    before = (broken / "ledger.sqlite").read_bytes()
    corrupt = cli(broken, "usage")
    assert corrupt.returncode == 1 and "cannot be used" in corrupt.stderr and "move it aside" in corrupt.stderr
    assert len(corrupt.stderr.strip().splitlines()) == 1
    assert (broken / "ledger.sqlite").read_bytes() == before


def test_reports_are_kept_a_few_minutes_for_the_running_jobs_history(home, backend, monkeypatch):
    records, now = ledger(home), time.time()
    records.acquire(job="train", devices=2, pool_devices=range(4))
    for device, ago in ((0, HISTORY_S + 100), (0, 100), (0, 50), (1, 50)):
        with monkeypatch.context() as clock:
            clock.setattr(time, "time", lambda ago=ago: now - ago)
            records.report(job="train", device=device, memory_bytes=ago * 1e6, utilization=0.5)
    history = records.history()
    assert [(s.device, s.memory_bytes) for s in history] == [(0, 100e6), (0, 50e6), (1, 50e6)]  # older: gone
    records.release(job="train")
    assert records.history() == []
    if backend == "sqlite":  # a ledger from before the history: the table is added when it is opened
        with sqlite3.connect(home / "ledger.sqlite") as connection:
            connection.execute("DROP TABLE samples")
        ledger(home).report(job="other", device=2, memory_bytes=1.0, utilization=0.1)
        assert [s.job for s in ledger(home).history()] == ["other"]
