"""The table of bad inputs and faults: each row is what a user does wrong (or what goes wrong under them),
run through the real CLI in an ONEGPU_HOME of its own, and what they must see.

A row whose command fails before any worker starts runs in the test's own process (typer's CliRunner: the same
``main``, arguments and environment, without the seconds of a new interpreter); a row whose script starts workers
(``tests/scripts/faults_*.py``) runs the real CLI in a process of its own.

A row passes when the command exits with ``exit_code``, its last line on stderr is ``message`` (a regular
expression matched against the whole line), no traceback is shown (unless the row allows the workers'
own), no process of the row is left running and no device is left leased.

Rows are grouped by area in ``ROWS`` below; ``tests/test_bad_input.py`` runs them all.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"


@dataclass(frozen=True)
class Row:
    """One bad input. ``args`` are the ``onegpu`` command's arguments; ``{tag}`` in them becomes a string
    unique to the run (to find its processes), ``{home}`` its ONEGPU_HOME, ``{scripts}`` tests/scripts."""

    id: str
    args: tuple[str, ...]
    message: str  # regular expression for the whole last line of stderr
    exit_code: int = 1
    pool_toml: str | None = "cpu_slots = 4\nslot_memory_gb = 2\n"
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None  # prepares the home (or breaks it) before the command
    tracebacks: bool = False  # a failing worker's own traceback may be shown above the last line
    timeout: float = 120

    @property
    def starts_workers(self) -> bool:
        """Whether the command gets as far as starting workers (only the ``faults_*`` scripts do)."""
        return any(arg.startswith("{scripts}/faults_") for arg in self.args)


@dataclass(frozen=True)
class Outcome:
    result: subprocess.CompletedProcess
    home: Path
    tag: str


def run_row(row: Row, home: Path) -> Outcome:
    tag = f"badinput-{uuid.uuid4().hex[:12]}"
    home.mkdir(parents=True, exist_ok=True)
    if row.pool_toml is not None:
        (home / "pool.toml").write_text(row.pool_toml)
    if row.setup is not None:
        row.setup(home)
    fill = lambda text: text.format(tag=tag, home=home, scripts=SCRIPTS)
    changes = {"ONEGPU_HOME": str(home), **{k: fill(v) for k, v in row.env.items()}}
    if not row.starts_workers:
        return Outcome(result=_in_process([fill(arg) for arg in row.args], changes), home=home, tag=tag)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **changes}
    result = subprocess.run(
        [sys.executable, "-m", "onegpu", *map(fill, row.args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=row.timeout,
        env=env,
    )
    return Outcome(result=result, home=home, tag=tag)


def _in_process(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``onegpu *args`` run by this process, as a process's result; an exception that escaped is its traceback."""
    import traceback

    from typer.testing import CliRunner

    from onegpu.cli import app

    cwd, environ = os.getcwd(), dict(os.environ)
    os.chdir(ROOT)
    try:
        result = CliRunner().invoke(app, args, env=env)
    finally:  # the command's own changes too (``onegpu run`` marks the environment it launches from)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(args, result.exit_code, stdout=result.stdout, stderr=stderr)


def processes_of(tag: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", tag], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


def leases_in(home: Path) -> list:
    """The devices still leased in ``home``'s ledger (none when it has no readable ledger)."""
    from onegpu.pool.ledger import open_ledger

    if not (home / "ledger.sqlite").is_file():
        return []
    try:
        return open_ledger(url=None, home=home, ttl_s=3600).holdings()
    except Exception:  # noqa: BLE001 - a row that breaks the ledger on purpose
        return []


def check_row(row: Row, outcome: Outcome) -> None:
    result = outcome.result
    lines = result.stderr.strip().splitlines()
    assert result.returncode == row.exit_code, f"exit {result.returncode}, wanted {row.exit_code}:\n{result.stderr}"
    assert lines, "nothing was said"
    assert re.fullmatch(row.message, lines[-1]), f"last line {lines[-1]!r} does not match {row.message!r}"
    if not row.tracebacks:
        assert "Traceback" not in result.stderr, result.stderr
    assert processes_of(outcome.tag) == [], "processes left running"
    while _LOCKERS:  # the row's command has ended: release the ledger it found locked, to read it
        locker = _LOCKERS.pop()
        locker.kill()
        locker.wait()
    assert leases_in(outcome.home) == [], "devices left leased"


# The rows, by area; each area's list is extended where that area is handled.
ROWS: list[Row] = [
    Row(
        id="script-missing",
        args=("run", "missing.py"),
        message=re.escape(
            "onegpu: script 'missing.py' not found: give the path of a Python file, e.g. onegpu run train.py"
        ),
    ),
    Row(
        id="workers-zero",
        args=("run", "--workers", "0", "{scripts}/job.py", "ok"),
        message=re.escape("onegpu: --workers 0: a job needs at least 1 worker"),
    ),
    Row(
        id="workers-env-not-a-number",
        args=("run", "{scripts}/job.py", "ok"),
        env={"ONEGPU_WORKERS": "two"},
        message=re.escape(
            "onegpu: ONEGPU_WORKERS='two' is not a whole number: set it to the number of workers, e.g. 2"
        ),
    ),
    # prepare and the planner's model analysis: prepare twice, unfrozen models, batches the workers cannot
    # share, Advanced Parallelization pins, errors of the planner, and `onegpu plan`'s bad input
    *(
        Row(
            id=f"prepare-{mode}",
            args=("run", "--workers", "3", "{scripts}/faults_prepare.py", mode, "{tag}"),
            message=message,
        )
        for mode, message in (
            (
                "twice",
                re.escape(
                    "onegpu: this model was already prepared by onegpu.prepare(): call prepare once and use the "
                    "objects it returned (to prepare anew, pass newly built ones)"
                ),
            ),
            (
                "unfrozen",
                re.escape(
                    "onegpu: a parameter was unfrozen after onegpu.prepare(): set requires_grad before calling "
                    "prepare, so that its gradients are summed across workers"
                ),
            ),
            (
                "short-last-batch",
                re.escape(
                    "onegpu: the last batch holds 2 of 16 samples in batches of 7, fewer than the 3 workers: "
                    "pass drop_last=True to the DataLoader, or use e.g. batch_size=8"
                ),
            ),
            (
                "batch-below-workers",
                re.escape(
                    "onegpu: a global batch of 2 samples cannot be split among 3 workers: use a batch size of at "
                    "least 3, fewer workers, or drop_last=True for a short last batch"
                ),
            ),
        )
    ),
    Row(
        id="planner-error-reaches-every-worker-as-text",  # an exception that cannot be unpickled, on rank 0
        args=("run", "--workers", "2", "{scripts}/faults_prepare.py", "planner-error", "{tag}"),
        message=r"onegpu: worker rank \d failed \(exit code 1\): (RuntimeError: the planner failed on worker 0 \()?"
        r"Unpicklable: validate_architecture: the layers do not add up\)?",
        tracebacks=True,
    ),
    *(
        Row(
            id=f"advanced-pins-{name}",
            args=("run", "--workers", "2", "{scripts}/faults_prepare.py", "pins", pins, "{tag}"),
            message=re.escape(message),
        )
        for name, pins, message in (
            (
                "unknown",
                "tensor_parallel_degree=2",
                "onegpu: unknown pin 'tensor_parallel_degree': known pins are dp, tp, pp, microbatches, schedule, "
                "sharding, activation_checkpointing, offload, mixed_precision, compile, num_stages, num_micro_batches, "
                "activation_recomputation, distribute_parameter, pipeline_parallel",
            ),
            ("tp-zero", "tp=0", "onegpu: tp=0: give a whole number >= 1"),
            (
                "sharding",
                "sharding=bogus",
                "onegpu: sharding='bogus' is not known: use one of none, optimizer, gradients, parameters, hybrid",
            ),
            (
                "schedule",
                "schedule=zigzag",
                "onegpu: schedule='zigzag' is not known: use one of gpipe, 1f1b, interleaved, zero-bubble",
            ),
            (
                "checkpointing",
                "activation_checkpointing=some",
                "onegpu: activation_checkpointing='some': use none, selective, full, or a number of blocks",
            ),
            (  # other values than 0 (2.5, "three", True): tests/test_trials.py, in-process
                "trials-zero",
                "trials=0",
                "onegpu: trials=0: give how many of the best plans to time, a whole number >= 1, e.g. 3",
            ),
        )
    ),
    Row(
        id="advanced-trials-with-a-plan",
        args=("run", "--workers", "2", "{scripts}/faults_prepare.py", "trials-with-plan", "{tag}"),
        message=re.escape(
            "onegpu: trials=2 times the planner's plans, but prepare() was given plan=: drop it, or call "
            "enable_advanced_parallelization() without trials"
        ),
    ),
    Row(  # decided by the planner on rank 0, raised on every worker
        id="advanced-pins-tp-the-model-cannot-take",
        args=("run", "--workers", "3", "{scripts}/faults_prepare.py", "pins", "tp=3", "{tag}"),
        message=r"onegpu: tp=3 cannot split Qwen2ForCausalLM \(.*cannot be divided among 3 workers.*\): use one of 1",
    ),
    *(
        Row(id=f"plan-{name}", args=("plan", "--model", "gpt2", "--seq-len", "1024", *extra), message=message)
        for name, extra, message in (
            (
                "unknown-cluster",
                ("--global-batch-size", "32", "--cluster", "h900"),
                r"onegpu: 'h900' is not a cluster preset \(a100-40gb, .*\): use one of them or the path to a "
                r"cluster YAML file",
            ),
            (
                "tp-not-dividing-a-node",
                ("--global-batch-size", "32", "--cluster", "a100-80gb", "--tp", "3"),
                re.escape("onegpu: tp=3 must divide the 8 devices of a node: tensor parallelism stays inside a node"),
            ),
            (
                "unknown-schedule",
                ("--global-batch-size", "32", "--cluster", "a100-80gb", "--schedule", "zigzag"),
                re.escape("onegpu: schedule='zigzag' is not known: use one of gpipe, 1f1b, interleaved, zero-bubble"),
            ),
            (
                "batch-not-split",
                ("--global-batch-size", "12", "--cluster", "a100-80gb", "--dp", "8"),
                re.escape(
                    "onegpu: global batch size 12 cannot be split evenly over any data-parallel degree the 8 devices "
                    "allow: use a multiple of 8"
                ),
            ),
        )
    ),
    Row(
        id="plan-bad-yaml",
        args=(
            "plan",
            "--model",
            "gpt2",
            "--seq-len",
            "1024",
            "--global-batch-size",
            "32",
            "--cluster",
            "{home}/bad.yaml",
        ),
        message=r"onegpu: .*/bad\.yaml: invalid YAML at line 2 \(.*\): fix the syntax there",
        setup=lambda home: (home / "bad.yaml").write_text("device: {name: x\nnodes: [\n"),
    ),
    Row(
        id="plan-unknown-model",
        args=("plan", "--model", "llama9", "--global-batch-size", "8", "--seq-len", "8", "--cluster", "a100-80gb"),
        message=r"onegpu: model 'llama9' is neither a preset \(gpt2, .*\) nor a config\.json file or directory",
    ),
]


# -- checkpoint files, pool configuration, ledger -------------------------------------------------------------
POOL = "cpu_slots = 4\nslot_memory_gb = 2\n"
FLAVORS = "choose one of Small.2GB, Medium.4GB, Large.8GB"
HOME_FIX = re.escape("point ONEGPU_HOME at a directory you can write to (it is created if missing)")
HUGE = r"onegpu: \S+/pool\.toml: \[flavors\] Huge = 99: this pool has 4 devices; add a flavor of at most 4 devices"
PG_DOWN = (
    r"onegpu: cannot connect to the PostgreSQL ledger at 127\.0\.0\.1:1/onegpu \(.*Connection refused\): start the "
    r"server, or fix ONEGPU_DATABASE_URL \(or database_url in pool\.toml\)"
)
_LOCKERS: list[subprocess.Popen] = []  # other processes, holding a ledger's lock until the row is checked


def _corrupt_ledger(home: Path) -> None:
    (home / "ledger.sqlite").write_bytes(b"this is not a database" * 100)


def _locked_ledger(home: Path) -> None:
    from onegpu.pool.ledger import open_ledger

    open_ledger(url=None, home=home, ttl_s=30)
    hold = "import sqlite3, sys, time\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    hold += "c.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(20)\n"
    locker = subprocess.Popen(
        [sys.executable, "-c", hold, str(home / "ledger.sqlite")], stdout=subprocess.PIPE, text=True
    )
    assert locker.stdout.readline().strip() == "locked"
    _LOCKERS.append(locker)


def _a_file_of_notes(home: Path) -> None:
    (home / "notes.txt").write_text("my notes")


ROWS += [
    Row(
        id="save-pretrained-over-a-file",
        args=("run", "--workers", "2", "{scripts}/faults_files.py", "save-to", "{home}/notes.txt", "{tag}"),
        setup=_a_file_of_notes,
        message=r"onegpu: save_pretrained: \S+/notes\.txt is a file: give the path of a directory to write the "
        r"checkpoint in",
    ),
    Row(
        id="ledger-deleted-while-the-job-runs",
        args=("run", "--workers", "2", "{scripts}/faults_files.py", "delete-ledger", "-", "{tag}"),
        exit_code=0,  # the job finished: only its usage is lost, which a warning says
        message=r"onegpu: warning: the usage of job \S+ \(devices 0,1 for \d+ s\) was not recorded: the ledger \S+ was "
        r"deleted or emptied while in use \(no such table: leases\): the next command starts a new one; restore it "
        r"from a backup to keep the usage it held",
    ),
    Row(
        id="pool-negative-price",
        args=("usage",),
        pool_toml=POOL + "price_per_device_hour = -5\n",
        message=r"onegpu: \S+/pool\.toml: price_per_device_hour = -5: give 0 or a positive number",
    ),
    *(
        Row(
            id=f"pool-no-flavor-fits-{args[0]}",
            args=args,
            pool_toml=POOL + "[flavors]\nHuge = 99\n",
            message=HUGE,
        )
        for args in (("smi",), ("run", "{scripts}/job.py", "ok", "{tag}"), ("switch", "Huge"), ("usage",))
    ),
    Row(
        id="switch-to-a-flavor-larger-than-the-pool",
        args=("switch", "Huge"),
        pool_toml=POOL + "[flavors]\nSmall = 1\nHuge = 99\n",
        message=re.escape("onegpu: Huge needs 99 devices and this pool has 4: choose one of Small.2GB"),
    ),
    *(
        Row(
            id=f"home-is-a-file-{args[0]}",
            args=args,
            env={"ONEGPU_HOME": "{home}/pool.toml"},
            message=rf"onegpu: ONEGPU_HOME=\S+/pool\.toml is a file, not a directory: {HOME_FIX}",
        )
        for args in (
            ("run", "--workers", "2", "{scripts}/job.py", "ok", "{tag}"),
            ("smi",),
            ("switch", "Large"),
            ("usage",),
        )
    ),
    *(
        Row(
            id=f"home-under-a-file-{args[0]}",
            args=args,
            env={"ONEGPU_HOME": "{home}/pool.toml/onegpu"},
            message=rf"onegpu: ONEGPU_HOME=\S+/pool\.toml/onegpu cannot be written \(Not a directory\): {HOME_FIX}",
        )
        for args in (("run", "{scripts}/job.py", "ok", "{tag}"), ("smi",), ("switch", "Large"), ("usage",))
    ),
    *(
        Row(
            id=f"postgresql-down-{args[0]}",
            args=args,
            env={"ONEGPU_DATABASE_URL": "postgresql://onegpu@127.0.0.1:1/onegpu"},
            message=PG_DOWN,
        )
        for args in (("run", "--workers", "2", "{scripts}/job.py", "ok", "{tag}"), ("smi",), ("usage",))
    ),
    Row(
        id="pool-not-toml",
        args=("smi",),
        pool_toml="cpu_slots = \n",
        message=r"onegpu: \S+/pool\.toml is not valid TOML \(.*\): fix it, or delete it for the defaults",
    ),
    Row(
        id="pool-unknown-key",
        args=("run", "{scripts}/job.py", "ok", "{tag}"),
        pool_toml="cpu_slot = 4\n",
        message=r"onegpu: \S+/pool\.toml: unknown key 'cpu_slot'; known keys are address, admins, backend, cpu_slots, "
        r"database_url, device_resource, flavors, lease_ttl_s, price_per_device_hour, slot_memory_gb",
    ),
    Row(
        id="pool-unknown-backend",
        args=("run", "{scripts}/job.py", "ok", "{tag}"),
        pool_toml='backend = "slurm"\n',
        message=r'onegpu: \S+/pool\.toml: backend = \'slurm\': use "local" \(this machine\) or "ray" \(a Ray cluster\)',
    ),
    *(
        Row(
            id=f"ray-pool-unreachable-{args[0]}",
            args=args,
            pool_toml='backend = "ray"\naddress = "127.0.0.1:1"\n',
            message=r"onegpu: cannot reach the Ray cluster at 127\.0\.0\.1:1 \(.*refused\): start it with "
            r"`ray start --head`, or fix address in \S+/pool\.toml",
        )
        for args in (("run", "--workers", "2", "{scripts}/job.py", "ok", "{tag}"), ("smi",), ("usage",))
    ),
    *(
        Row(
            id=f"pool-{key}-{value.strip(chr(39))}",
            args=args,
            pool_toml=f"{key} = {value}\n",
            message=rf"onegpu: \S+/pool\.toml: {key} = {value}: give {wanted} number",
        )
        for key, value, wanted, args in (
            ("cpu_slots", "0", "a positive", ("smi",)),
            ("cpu_slots", "2.5", "a whole", ("switch", "Small")),
            ("slot_memory_gb", "-1", "a positive", ("usage",)),
            ("lease_ttl_s", "0", "a positive", ("run", "{scripts}/job.py", "ok", "{tag}")),
            ("price_per_device_hour", "'free'", "0 or a positive", ("usage",)),
        )
    ),
    *(
        Row(
            id=f"pool-bad-flavors-{name}",
            args=("smi",),
            pool_toml=POOL + flavors,
            message=r"onegpu: \S+/pool\.toml: \[flavors\] maps names to device counts \(whole numbers >= 1\)",
        )
        for name, flavors in (("zero", "[flavors]\nSmall = 0\n"), ("not-a-table", "flavors = 3\n"))
    ),
    *(
        Row(
            id=f"ledger-corrupt-{args[0]}",
            args=args,
            setup=_corrupt_ledger,
            message=r"onegpu: the ledger \S+/ledger\.sqlite cannot be used \(DatabaseError: file is not a database\): "
            r"move it aside to start a new one; the usage recorded in it stays there",
        )
        for args in (("run", "{scripts}/job.py", "ok", "{tag}"), ("smi",), ("usage",))
    ),
    Row(
        id="ledger-locked",
        args=("usage",),
        setup=_locked_ledger,
        env={"ONEGPU_LEDGER_BUSY_S": "0.5"},
        message=r"onegpu: the ledger \S+/ledger\.sqlite stayed locked by another process: retry, or stop the process "
        r"holding it",
    ),
    Row(
        id="switch-unknown-flavor",
        args=("switch", "Jumbo"),
        message=re.escape(f"onegpu: no flavor 'Jumbo' on this pool: {FLAVORS}"),
    ),
    Row(
        id="switch-flavor-larger-than-the-pool",
        args=("switch", "xLarge"),
        message=re.escape(f"onegpu: xLarge needs 8 devices and this pool has 4: {FLAVORS}"),
    ),
]


# launch lifecycle and failure reports (issue 11: a rank that leaves early, save_pretrained on one rank, a failed save)
ROWS += [
    Row(
        id="one-worker-exits-0-while-the-others-train",
        args=("run", "--workers", "2", "{scripts}/faults_job.py", "exit0", "{home}", "{tag}"),
        message=r"onegpu: worker rank 1 ended \(exit code 0\) while the other workers still needed it: every worker "
        r"must run the whole script \(is a return or sys\.exit taken on one rank only\?\)",
    ),
    Row(
        id="save-pretrained-of-a-sharded-model-on-the-main-process-only",
        args=(
            "run",
            "--workers",
            "2",
            "{scripts}/faults_job.py",
            "save-on-main",
            "{home}",
            "{tag}",
            "--strategy",
            "fsdp",
        ),
        message=r"onegpu: onegpu\.save_pretrained was called on rank 0 after rank 1 had ended: the model is split among "
        r"the workers \(fsdp\), so call it on every worker, not only on the main process",
    ),
    Row(
        id="save-pretrained-of-a-sharded-model-on-the-main-process-while-the-others-train",
        args=(
            "run",
            "--workers",
            "2",
            "{scripts}/faults_job.py",
            "save-on-main-train",
            "{home}",
            "{tag}",
            "--strategy",
            "fsdp",
        ),
        env={"ONEGPU_COLLECTIVE_TIMEOUT": "4"},
        message=r"onegpu: onegpu\.save_pretrained waited \d+ s on rank 0 for rank 1 to call it too: the model is split "
        r"among the workers \(fsdp\), so call it on every worker, not only on the main process",
    ),
    Row(
        id="save-pretrained-under-a-regular-file",
        args=("run", "--workers", "2", "{scripts}/faults_job.py", "save-bad-path", "{home}", "{tag}"),
        message=r"onegpu: (worker rank 0 failed \(exit code 1\): \w+Error: )?.*a-file.*",
        tracebacks=True,  # rank 0's own, above the line that names it
    ),
]


# states (issue 15): another model's state, a path that cannot hold states, an export of nothing
ROWS += [
    Row(
        id="state-of-another-model",
        args=("run", "--workers", "2", "{scripts}/faults_state.py", "other-model", "{home}/states", "{tag}"),
        message=r"onegpu: the state in .*/states/step-00000000 was saved from another model: this Sequential: its "
        r"parameter '0\.weight' has shape \(6, 4\), the state's \(8, 4\) \(load a state of this model, or save to "
        r"another directory\)",
    ),
    Row(
        id="states-under-a-file",
        args=("run", "--workers", "1", "{scripts}/faults_state.py", "unwritable", "{home}/run/states", "{tag}"),
        message=r"onegpu: .*/run/notes\.txt is a file: give save_state and load_state a directory for the states",
    ),
    Row(
        id="export-of-a-missing-state",
        args=("export", "{home}/missing", "{home}/out"),
        message=r"onegpu: export: .*/missing does not exist: give a directory onegpu\.save_state wrote, or a step-\* "
        r"in it",
    ),
]


# restarts and resizing (issue 15): a job that uses up its restarts, `onegpu resize` and `switch --job` asked for
# what cannot be: nothing is written to any job
ROWS += [
    Row(
        id="max-restarts-negative",
        args=("run", "--max-restarts", "-1", "{scripts}/job.py", "ok"),
        message=re.escape("onegpu: --max-restarts -1: give how many times a failed job may restart, 0 or more"),
    ),
    Row(
        id="restarts-used-up",
        args=("run", "--workers", "1", "--max-restarts", "1", "{scripts}/faults_restart.py", "{tag}"),
        message=re.escape("onegpu: worker rank 0 failed (exit code 1): exited with no luck (after 1 restart)"),
    ),
    Row(
        id="resize-unknown-job",
        args=("resize", "alice-0000", "2"),
        message=re.escape("onegpu: no running job 'alice-0000': onegpu smi lists the running jobs"),
    ),
    Row(
        id="switch-job-unknown-job",
        args=("switch", "Medium", "--job", "alice-0000"),
        message=re.escape("onegpu: no running job 'alice-0000': onegpu smi lists the running jobs"),
    ),
    Row(
        id="resize-unknown-flavor",
        args=("resize", "alice-0000", "Huge"),
        message=re.escape(f"onegpu: no flavor 'Huge' on this pool: {FLAVORS}"),
    ),
    Row(
        id="resize-beyond-the-pool",
        args=("resize", "alice-0000", "9"),
        message=re.escape("onegpu: 9 devices: this pool has 4; the largest flavor is Large.8GB (4 devices)"),
    ),
    *(
        Row(
            id=f"resize-to-{count}",
            args=("resize", "alice-0000", count),
            message=re.escape(
                f"onegpu: {count} devices: a job needs at least 1; to stop it, stop its onegpu run (Ctrl-C)"
            ),
        )
        for count in ("0",)
    ),
]


# several users on one pool (issue 16): cancelling what is not there or not yours, a malformed admins list
def _alice_waits_in_line(home: Path) -> None:
    import sqlite3
    import time

    from onegpu.pool.ledger import open_ledger

    open_ledger(url=None, home=home, ttl_s=30)
    with sqlite3.connect(home / "ledger.sqlite") as connection:  # a place in line, renewed now by its (absent) job
        connection.execute("INSERT INTO queue VALUES ('alice-1234', 'alice', 2, ?, ?)", (time.time(), time.time()))


def _alice_ran_a_job(home: Path) -> None:
    from onegpu.pool.ledger import open_ledger

    ledger = open_ledger(url=None, home=home, ttl_s=30)
    ledger.acquire(job="alice-0001", devices=1, pool_devices=range(4), user="alice")
    ledger.release(job="alice-0001")


ROWS += [
    Row(
        id="cancel-unknown-job",
        args=("cancel", "alice-0000"),
        message=re.escape("onegpu: no job 'alice-0000' runs or waits in this pool: onegpu jobs shows none"),
    ),
    Row(
        id="cancel-another-users-job",
        args=("cancel", "alice-1234"),
        setup=_alice_waits_in_line,
        env={"LOGNAME": "bob", "USER": "bob"},
        message=r"onegpu: job alice-1234 belongs to alice: you \(bob\) may cancel only your own jobs; an administrator "
        r"may cancel any \(add your user name to admins = \[\.\.\.\] in \S+/pool\.toml\)",
    ),
    Row(
        id="cancel-an-ended-job",
        args=("cancel", "alice-0001"),
        setup=_alice_ran_a_job,
        env={"LOGNAME": "alice", "USER": "alice"},
        message=re.escape("onegpu: job alice-0001 already ended"),
    ),
    *(
        Row(
            id=f"pool-admins-{name}-{args[0]}",
            args=args,
            pool_toml=POOL + f"admins = {admins}\n",
            message=rf"onegpu: \S+/pool\.toml: admins = {re.escape(shown)}: give a list of user names, e\.g\. "
            r'admins = \["alice", "bob"\]',
        )
        for name, admins, shown, args in (
            ("not-a-list", '"alice"', "'alice'", ("cancel", "alice-0000")),
            ("not-names", "[1, 2]", "[1, 2]", ("jobs",)),
        )
    ),
]
