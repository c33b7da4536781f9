"""Device leases and usage intervals, in one database shared by every job of the pool.

SQLite by default (``$ONEGPU_HOME/ledger.sqlite``, WAL journal, safe for concurrent processes);
a ``postgresql://`` URL (``ONEGPU_DATABASE_URL``) selects PostgreSQL with the same statements.
Every change is one transaction that first expires leases whose job stopped renewing them (a
job killed with ``kill -9``): their interval ends at the last renewal, so nothing is counted twice
and nothing is lost. Jobs waiting for devices are served first come, first served.
``cancels`` records who asked a job to stop (``onegpu cancel``): a running job sees it when it renews
its leases, a waiting one while it waits; the rows stay, as a record.
With PostgreSQL, docs/postgres-roles.md gives each user a role of their own that cannot rewrite
others' rows; the ledger then writes only tables that exist (a user's role may not create any).
"""

from __future__ import annotations

import getpass
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onegpu.errors import UsageError
from onegpu.pool.config import writable_home
from onegpu.pool.ledger_rows import Cancellation, Holding, Interval, Stat, Waiting, fewest_nodes
from onegpu.settings import settings

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS leases (device INTEGER PRIMARY KEY, job TEXT NOT NULL, user_name TEXT NOT NULL,"
    " host TEXT, pid INTEGER, started DOUBLE PRECISION NOT NULL, renewed DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS intervals (job TEXT NOT NULL, user_name TEXT NOT NULL, device INTEGER NOT NULL,"
    " started DOUBLE PRECISION NOT NULL, ended DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS queue (job TEXT PRIMARY KEY, user_name TEXT NOT NULL, devices INTEGER NOT NULL,"
    " created DOUBLE PRECISION NOT NULL, renewed DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS stats (device INTEGER PRIMARY KEY, job TEXT NOT NULL, memory_bytes DOUBLE PRECISION NOT NULL,"
    " utilization DOUBLE PRECISION NOT NULL, reported DOUBLE PRECISION NOT NULL)",
    # a Ray pool's nodes, each given device ids of its own the first time it is seen (never reused)
    "CREATE TABLE IF NOT EXISTS nodes (node TEXT PRIMARY KEY, host TEXT NOT NULL, first_device INTEGER NOT NULL,"
    " slots INTEGER NOT NULL, seen DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS cancels (job TEXT PRIMARY KEY, by_user TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)",
    # the stats' recent past, for the history onegpu smi draws: HISTORY_S per device, while its job runs
    "CREATE TABLE IF NOT EXISTS samples (device INTEGER NOT NULL, job TEXT NOT NULL, memory_bytes DOUBLE PRECISION"
    " NOT NULL, utilization DOUBLE PRECISION NOT NULL, reported DOUBLE PRECISION NOT NULL)",
)
HISTORY_S = 300.0  # at a report every 2 s (launch/reporting.py): 150 rows per device at most


class LedgerError(UsageError):
    """The ledger cannot be used; the message says why and what to do."""


class Ledger:
    """Leases on the devices ``0 .. size-1`` of one pool."""

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        where: str,
        ttl_s: float,
        placeholder: str,
        begin: str,
        begin_schema: str,
        errors: tuple[type[Exception], ...] = (sqlite3.DatabaseError,),
        server: bool = False,
    ) -> None:
        self._connect, self.where, self.ttl_s, self._server = connect, where, ttl_s, server
        self._mark, self._begin, self._errors = placeholder, begin, errors
        with self._transaction(begin=begin_schema) as run:  # the tables to lock may not exist yet
            for statement in SCHEMA:  # a PostgreSQL role of one user may use the tables but not create them
                if not (server and run("SELECT to_regclass(?)", statement.split()[5])[0][0]):
                    run(statement)

    @contextmanager
    def _transaction(self, *, begin: str | None = None) -> Iterator[Callable[..., list]]:
        try:
            connection = self._connect()
        except (*self._errors, OSError) as exc:
            raise LedgerError(self._explain(exc, connecting=True)) from None
        try:
            cursor = connection.cursor()
            cursor.execute(begin or self._begin)

            def run(statement: str, *values: Any) -> list:
                cursor.execute(statement.replace("?", self._mark), values)
                return cursor.fetchall() if cursor.description else []

            yield run
            connection.commit()
        except self._errors as exc:
            connection.rollback()
            raise LedgerError(self._explain(exc)) from None
        except BaseException:
            connection.rollback()
            raise
        finally:
            connection.close()

    def _explain(self, exc: Exception, *, connecting: bool = False) -> str:
        text = (str(exc).strip().splitlines() or [""])[0]  # a driver's hints follow on lines of their own
        if "locked" in text or "busy" in text:
            return f"the ledger {self.where} stayed locked by another process: retry, or stop the process holding it"
        if self._server and connecting:
            return (
                f"cannot connect to the PostgreSQL ledger at {self.where} ({text}): start the server, "
                "or fix ONEGPU_DATABASE_URL (or database_url in pool.toml)"
            )
        if self._server and "row-level security" in text:
            return (
                f"the PostgreSQL ledger at {self.where} refused a row ({text}): a user's role writes only what "
                f"docs/postgres-roles.md allows it; connect as the database role named as your OS user ({getpass.getuser()})"
            )
        if self._server:
            return (
                f"the PostgreSQL ledger at {self.where} failed ({type(exc).__name__}: {text}): check the database "
                "and your rights on it; the usage recorded in it stays there"
            )
        if "no such table" in text:
            return (
                f"the ledger {self.where} was deleted or emptied while in use ({text}): the next command starts "
                "a new one; restore it from a backup to keep the usage it held"
            )
        return (
            f"the ledger {self.where} cannot be used ({type(exc).__name__}: {text}): move it aside to start a new "
            "one; the usage recorded in it stays there"
        )

    def _expire(self, run: Callable[..., list], now: float) -> None:
        stale = now - self.ttl_s
        for lease in run("SELECT job, user_name, device, started, renewed FROM leases WHERE renewed < ?", stale):
            # once: docs/postgres-roles.md lets anyone record a stale lease's usage, and makes it unique
            run("INSERT INTO intervals VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", *lease)
        run("DELETE FROM leases WHERE renewed < ?", stale)
        run("DELETE FROM stats WHERE job NOT IN (SELECT job FROM leases)")
        run("DELETE FROM samples WHERE job NOT IN (SELECT job FROM leases)")
        run("DELETE FROM queue WHERE renewed < ?", stale)

    def acquire(
        self,
        *,
        job: str,
        devices: int,
        pool_devices: Mapping[int, str] | Sequence[int],
        wait: bool = True,
        on_wait: Callable[[str], None] | None = None,
        poll_s: float = 0.5,
        user: str | None = None,
    ) -> tuple[int, ...]:
        """Lease ``devices`` of ``pool_devices`` for ``job``, all at once, on as few nodes as can serve them
        (``pool_devices`` maps each device id to its node; a sequence is one node's); wait in line unless ``wait``
        is False."""
        user = user or getpass.getuser()
        node_of = pool_devices if isinstance(pool_devices, Mapping) else dict.fromkeys(pool_devices, "")
        pool_size = len(node_of)
        told = False
        while True:
            self._leave_if_cancelled(job=job)
            with self._transaction() as run:
                now = time.time()  # under the lock: after the end of the lease this one may follow
                self._expire(run, now)
                if not run("SELECT job FROM queue WHERE job = ?", job):
                    run("INSERT INTO queue VALUES (?, ?, ?, ?, ?)", job, user, devices, now, now)
                run("UPDATE queue SET renewed = ? WHERE job = ?", now, job)
                first = run("SELECT job FROM queue ORDER BY created, job LIMIT 1")[0][0]
                leases = run("SELECT device, job FROM leases")
                held = {device for device, _ in leases}
                free = [d for d in node_of if d not in held]
                if first == job and len(free) >= devices:
                    chosen = fewest_nodes(free, node_of=node_of, count=devices)
                    for device in chosen:
                        run(
                            "INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
                            device,
                            job,
                            user,
                            socket.gethostname(),
                            os.getpid(),
                            now,
                            now,
                        )
                    run("DELETE FROM queue WHERE job = ?", job)
                    return chosen
                holders = sorted({holder for _, holder in leases})
                mine = run("SELECT created FROM queue WHERE job = ?", job)[0][0]
                ahead = run("SELECT COUNT(*) FROM queue WHERE created < ?", mine)[0][0]
                if not wait:
                    run("DELETE FROM queue WHERE job = ?", job)
            wanted = f"{devices} device{'s' if devices > 1 else ''}"
            state = f"{len(free)} of {pool_size} free, held by {', '.join(holders) or 'nobody'}" + (
                f"; {ahead} job{'s' if ahead > 1 else ''} ahead in line" if first != job else ""
            )
            if not wait:
                raise LedgerError(
                    f"the pool cannot serve {wanted} now ({state}): run again later, or without --no-wait to wait in line"
                )
            waiting = f"waiting for {wanted}: {state}"
            if on_wait is not None and not told:
                on_wait(waiting)
                told = True
            time.sleep(poll_s)

    def register_nodes(self, nodes: Sequence[tuple[str, str, int]]) -> dict[str, int]:
        """The first device id of each ``(node, host, slots)``: a node seen before keeps its ids, a new one gets
        ids no node had before."""
        now = time.time()
        with self._transaction() as run:
            known = {node: (first, slots) for node, first, slots in run("SELECT node, first_device, slots FROM nodes")}
            after = max((first + slots for first, slots in known.values()), default=0)
            for node, host, slots in nodes:
                if node in known and slots <= known[node][1]:
                    run("UPDATE nodes SET seen = ? WHERE node = ?", now, node)
                    continue
                run("DELETE FROM nodes WHERE node = ?", node)  # new, or more slots than its ids: ids of its own
                run("INSERT INTO nodes VALUES (?, ?, ?, ?, ?)", node, host, after, slots, now)
                known[node], after = (after, slots), after + slots
        return {node: known[node][0] for node, _, _ in nodes}

    def _leave_if_cancelled(self, *, job: str) -> None:
        """A job cancelled while in line leaves it, with a one-line error that says by whom."""
        by = self.cancelled_by(job=job)
        if by is not None:
            with self._transaction() as run:
                run("DELETE FROM queue WHERE job = ?", job)
            raise LedgerError(f"job {job} was cancelled by {by} with onegpu cancel while it waited in line")

    def renew(self, *, job: str) -> None:
        """Keep ``job``'s leases alive (a heartbeat)."""
        now = time.time()
        with self._transaction() as run:
            run("UPDATE leases SET renewed = ? WHERE job = ?", now, job)

    def release(self, *, job: str, devices: tuple[int, ...] | None = None, at: float | None = None) -> None:
        """End ``job``'s leases (only those of ``devices`` when given: a job that shrinks, or lost a node), recording
        their intervals up to now (or ``at``: when a lost node stopped serving the job)."""
        with self._transaction() as run:
            now = time.time()  # under the lock: before the start of a lease that follows this one
            now = min(at, now) if at else now  # a lost node: billed up to the loss
            for user, device, started in run("SELECT user_name, device, started FROM leases WHERE job = ?", job):
                if devices is None or device in devices:
                    run("INSERT INTO intervals VALUES (?, ?, ?, ?, ?)", job, user, device, started, max(started, now))
                    run("DELETE FROM leases WHERE device = ?", device)
                    run("DELETE FROM stats WHERE device = ?", device)
                    run("DELETE FROM samples WHERE device = ?", device)
            if devices is None:
                run("DELETE FROM stats WHERE job = ?", job)
                run("DELETE FROM samples WHERE job = ?", job)
                run("DELETE FROM queue WHERE job = ?", job)

    def cancel(self, *, job: str, by_user: str, allowed: Callable[[str], None]) -> Cancellation:
        """Record that ``by_user`` asks ``job`` to stop (the job sees it: ``cancelled_by``) if it runs or waits, was
        not asked before, and ``allowed(its user)`` does not raise; returns what was found."""
        with self._transaction() as run:
            self._expire(run, time.time())
            earlier = next(iter(run("SELECT by_user FROM cancels WHERE job = ?", job)), (None,))[0]
            found = Cancellation("ended" if earlier else "unknown", None, earlier)
            for state, table in (("running", "leases"), ("waiting", "queue"), ("ended", "intervals")):
                owner = run(f"SELECT user_name FROM {table} WHERE job = ? LIMIT 1", job)  # noqa: S608 - our names
                if owner:
                    found = Cancellation(state, owner[0][0], earlier)
                    break
            if found.state in ("running", "waiting") and earlier is None:
                allowed(found.user)
                run("INSERT INTO cancels VALUES (?, ?, ?)", job, by_user, time.time())
        return found

    def cancelled_by(self, *, job: str) -> str | None:
        """Who asked ``job`` to stop with ``onegpu cancel`` (None: nobody)."""
        with self._transaction(begin="SELECT 1") as run:  # a read: it takes no lock (every renewal asks)
            found = run("SELECT by_user FROM cancels WHERE job = ?", job)
        return found[0][0] if found else None

    def waiting(self) -> list[Waiting]:
        """The jobs in line for devices, first served first."""
        with self._transaction() as run:
            self._expire(run, time.time())
            rows = run("SELECT job, user_name, devices, created FROM queue ORDER BY created, job")
        return [Waiting(job, user, devices, created, position) for position, (job, user, devices, created) in
                enumerate(rows, start=1)]  # fmt: skip

    def report(self, *, job: str, device: int, memory_bytes: float, utilization: float) -> None:
        """A worker's current memory use and utilization of its device; kept as a sample for ``HISTORY_S``."""
        now = time.time()
        with self._transaction() as run:
            run("DELETE FROM stats WHERE device = ?", device)
            run("INSERT INTO stats VALUES (?, ?, ?, ?, ?)", device, job, memory_bytes, utilization, now)
            run("DELETE FROM samples WHERE device = ? AND (reported < ? OR job <> ?)", device, now - HISTORY_S, job)
            run("INSERT INTO samples VALUES (?, ?, ?, ?, ?)", device, job, memory_bytes, utilization, now)

    def holdings(self) -> list[Holding]:
        with self._transaction() as run:
            self._expire(run, time.time())
            rows = run("SELECT job, user_name, device, started, host, pid FROM leases ORDER BY started, device")
        jobs: dict[str, Holding] = {}
        for job, user, device, started, host, pid in rows:
            known = jobs.get(job)
            devices = (*known.devices, device) if known else (device,)
            jobs[job] = Holding(job, user, devices, min(started, known.since) if known else started, host, pid)
        return list(jobs.values())

    def stats(self) -> list[Stat]:
        with self._transaction() as run:
            return [Stat(*row) for row in run("SELECT device, job, memory_bytes, utilization, reported FROM stats")]

    def history(self) -> list[Stat]:
        """The running jobs' reports of the last ``HISTORY_S`` seconds, oldest first."""
        with self._transaction() as run:
            rows = run("SELECT device, job, memory_bytes, utilization, reported FROM samples ORDER BY reported")
        return [Stat(*row) for row in rows]

    def intervals(self, *, since: float | None = None, until: float | None = None) -> list[Interval]:
        """Every recorded interval that ended after ``since``, and the open ones up to now (or ``until``)."""
        now = until or time.time()
        with self._transaction() as run:
            self._expire(run, time.time())
            closed = run("SELECT job, user_name, device, started, ended FROM intervals WHERE ended >= ?", since or 0)
            open_ = run("SELECT job, user_name, device, started FROM leases")
        return [Interval(*row) for row in closed] + [Interval(*row, now) for row in open_]


def open_ledger(*, url: str | None, home: Path, ttl_s: float) -> Ledger:
    """The pool's ledger: SQLite in ``home`` unless ``url`` names a PostgreSQL database."""
    if url and url.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg
        except ImportError:
            raise LedgerError(f"{url.split('@')[-1]}: a PostgreSQL ledger needs psycopg: pip install psycopg") from None
        return Ledger(
            lambda: psycopg.connect(url),
            where=url.split("@")[-1],
            ttl_s=ttl_s,
            placeholder="%s",
            begin="LOCK TABLE leases IN EXCLUSIVE MODE",  # psycopg opens the transaction itself
            # concurrent CREATE TABLE IF NOT EXISTS can collide in PostgreSQL's catalog: one at a time
            begin_schema="SELECT pg_advisory_xact_lock(7310541)",
            errors=(psycopg.Error,),
            server=True,
        )
    if url and not url.startswith("sqlite:///"):
        raise LedgerError(f"ONEGPU_DATABASE_URL {url!r} is neither sqlite:///PATH nor postgresql://...")
    path = Path(url.removeprefix("sqlite:///")) if url else writable_home(home) / "ledger.sqlite"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LedgerError(f"database URL {url!r}: cannot create {path.parent} ({exc.strerror}): fix the URL") from None

    def connect() -> sqlite3.Connection:
        busy_s = settings().ledger_busy_s
        connection = sqlite3.connect(path, timeout=busy_s, isolation_level=None)
        connection.execute(f"PRAGMA busy_timeout={int(busy_s * 1000)}")
        deadline = time.monotonic() + busy_s
        while connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            try:  # persists in the file; SQLite does not wait for other openers while it switches
                connection.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    connection.close()
                    raise
                time.sleep(0.01)
        return connection

    return Ledger(
        connect, where=str(path), ttl_s=ttl_s, placeholder="?", begin="BEGIN IMMEDIATE", begin_schema="BEGIN IMMEDIATE"
    )
