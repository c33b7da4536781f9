"""The table of bad inputs and faults: each row is what a user does wrong (or what goes wrong under them),
run through the real CLI in an ONEGPU_HOME of its own, and what they must see.

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
    slow: bool = True  # starts workers: runs with the slow tests


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
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "ONEGPU_HOME": str(home),
        **{k: fill(v) for k, v in row.env.items()},
    }
    result = subprocess.run(
        [sys.executable, "-m", "onegpu", *map(fill, row.args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=row.timeout,
        env=env,
    )
    return Outcome(result=result, home=home, tag=tag)


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
    assert leases_in(outcome.home) == [], "devices left leased"


# The rows, by area; each area's list is extended where that area is handled.
ROWS: list[Row] = [
    Row(
        id="script-missing",
        args=("run", "missing.py"),
        message=re.escape("onegpu: script 'missing.py' not found: give the path of a Python file, e.g. onegpu run train.py"),
        slow=False,
    ),
    Row(
        id="workers-zero",
        args=("run", "--workers", "0", "{scripts}/job.py", "ok"),
        message=re.escape("onegpu: --workers 0: a job needs at least 1 worker"),
        slow=False,
    ),
    Row(
        id="workers-env-not-a-number",
        args=("run", "{scripts}/job.py", "ok"),
        env={"ONEGPU_WORKERS": "two"},
        message=re.escape("onegpu: ONEGPU_WORKERS='two' is not a whole number: set it to the number of workers, e.g. 2"),
        slow=False,
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
        args=("run", "--workers", "2", "{scripts}/faults_job.py", "save-on-main", "{home}", "{tag}", "--strategy", "fsdp"),
        message=r"onegpu: onegpu\.save_pretrained was called on rank 0 after rank 1 had ended: the model is split among "
        r"the workers \(fsdp\), so call it on every worker, not only on the main process",
    ),
    Row(
        id="save-pretrained-of-a-sharded-model-on-the-main-process-while-the-others-train",
        args=("run", "--workers", "2", "{scripts}/faults_job.py", "save-on-main-train", "{home}", "{tag}", "--strategy", "fsdp"),
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
