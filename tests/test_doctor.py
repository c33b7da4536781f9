"""The hang doctor on records written by hand: who is behind, missing or on another collective, and when
nothing hung. (tests/test_doctor_launch.py runs a real hung job.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onegpu.cli import app
from onegpu.launch import flight
from onegpu.launch.hang import explain, find_hang, read_records
from onegpu.report.doctor import diagnose

ALL_REDUCE = {"op": "all_reduce", "shapes": [[4]], "dtypes": ["Float"]}


def collectives(last: int, *, pending: bool, op: dict | None = None, group: str = "0") -> list[dict]:
    """Collectives 1..last of ``group``, all completed but the last when ``pending``."""
    rows = [{**ALL_REDUCE, "group": group, "seq": seq, "done": True, "created_ns": seq} for seq in range(1, last + 1)]
    if pending and rows:
        rows[-1] = {**rows[-1], **(op or {}), "done": False}
    return rows


def write_record(job: Path, rank: int, rows: list[dict], *, world: int = 3, phase: str | None = None, **extra) -> None:
    record = {
        "rank": rank,
        "world_size": world,
        "time": time.time(),
        "reason": "watchdog: stuck for 3 s" if any(not r["done"] for r in rows) else "asked by rank 0",
        "phase": phase,
        "recorder": "flight recorder" if rows else "sequence numbers",
        "groups": {"0": {"ranks": list(range(world)), "issued": max([0, *(r["seq"] for r in rows)])}},
        "collectives": rows,
        **extra,
    }
    (job / "flight").mkdir(parents=True, exist_ok=True)
    (job / "flight" / f"rank-{rank}.json").write_text(json.dumps(record))


@pytest.fixture
def job(tmp_path: Path) -> Path:
    directory = tmp_path / "jobs" / "alice-0001"
    directory.mkdir(parents=True)
    (directory / "job.json").write_text("{}")
    return directory


def test_a_rank_behind_by_one_collective_is_named_with_its_gap(job):
    write_record(job, 0, collectives(57, pending=True), phase="backward (gradient reduction)")
    write_record(job, 1, collectives(56, pending=False))
    write_record(job, 2, collectives(57, pending=True), phase="backward (gradient reduction)")
    line = explain(job, job="alice-0001")
    assert line == (
        "rank 1 is behind: ranks 0,2 wait in all_reduce #57 (backward (gradient reduction)); rank 1's last "
        f"collective is all_reduce #56 (1 behind); stacks in {job / 'stacks'}; run `onegpu doctor alice-0001`"
    )
    report = diagnose(job)
    assert "Sequence numbers reached: rank 0 #57, rank 1 #56, rank 2 #57. Behind: rank 1 by 1." in report
    assert "#57     all_reduce [4] Float" in report and "WAITING" in report


def test_a_rank_without_a_record_is_missing(job):
    write_record(job, 0, collectives(12, pending=True))
    write_record(job, 1, collectives(12, pending=True))
    hang = find_hang(read_records(job))
    assert hang.kind == "missing" and hang.missing == (2,)
    assert explain(job).startswith("ranks 0,1 wait in all_reduce #12; rank 2 is missing (no record: dead before")
    assert "rank 2: no record" in diagnose(job)


def test_ranks_on_different_collectives_at_the_same_number_disagree(job):
    gather = {"op": "all_gather", "shapes": [[3]], "dtypes": ["Long"]}
    write_record(job, 0, collectives(8, pending=True))
    write_record(job, 1, collectives(8, pending=True, op=gather), phase="forward")
    write_record(job, 2, collectives(8, pending=True))
    hang = find_hang(read_records(job))
    assert hang.kind == "mismatch" and hang.odd == (1,)
    assert explain(job).startswith(
        "rank 1 took another path at collective #8: rank 0 is in all_reduce [4] Float; rank 1 is in all_gather [3] "
        "Long (forward); rank 2 is in all_reduce [4] Float (a collective skipped or added on that rank)"
    )
    assert "Rank 1 issued another collective #8 than the others." in diagnose(job)


def test_workers_in_sync_did_not_hang(job):
    for rank in range(3):
        write_record(job, rank, collectives(20, pending=False))
    assert find_hang(read_records(job)) is None and diagnose(job) is None
    result = CliRunner().invoke(app, ["doctor", str(job)])
    assert result.exit_code == 0, result.output
    assert (
        result.stdout.strip() == "onegpu: job alice-0001 did not hang: its workers left no record of a stuck collective"
    )


def test_every_worker_in_the_same_collective_is_stuck_with_none_behind(job):
    for rank in range(2):
        write_record(job, rank, collectives(5, pending=True), world=2)
    assert explain(job).startswith("every worker waits in the same collective: ranks 0,1 wait in all_reduce #5; none")


def test_without_a_recorder_the_group_counts_still_show_the_gap(job):
    write_record(job, 0, [], world=2, groups={"0": {"ranks": [0, 1], "issued": 9}}, reason="watchdog: stuck")
    write_record(job, 1, [], world=2, groups={"0": {"ranks": [0, 1], "issued": 8}})
    assert explain(job).startswith(
        "rank 1 is behind: rank 0 waits in collective #9; rank 1's last collective is collective #8 (1 behind)"
    )


def test_records_of_an_earlier_hang_are_left_out(job):
    write_record(job, 0, collectives(3, pending=True))
    write_record(job, 1, collectives(2, pending=False), time=time.time() - 3600)
    assert find_hang(read_records(job)).missing == (1, 2)
    write_record(job, 2, collectives(2, pending=False), attempt=1)  # torchelastic's next attempt
    assert list(read_records(job)) == [2] and find_hang(read_records(job)) is None


def test_the_report_shows_the_scripts_frames_of_each_worker(job):
    write_record(job, 0, collectives(4, pending=True), world=1)
    (job / "stacks").mkdir()
    (job / "stacks" / "rank-0.txt").write_text(
        "Thread MainThread (1):\n"
        '  File "/venv/lib/python3.11/site-packages/onegpu/launch/worker.py", line 30, in run_script\n'
        "    runpy.run_path(script)\n"
        '  File "/home/alice/train.py", line 12, in <module>\n'
        "    dist.all_reduce(x)\n"
        '  File "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 3252, in all_reduce\n'
        "    work.wait()\n"
        "Thread onegpu-watchdog (2):\n"
        '  File "/src/onegpu/runtime/watchdog.py", line 56, in _watch\n'
        "    self._fire(*stuck)\n"
    )
    report = diagnose(job)
    assert (
        "      /home/alice/train.py:12 in <module>: dist.all_reduce(x)\n      ... in all_reduce (distributed_c10d.py:3252)"
        in report
    )
    assert "worker.py" not in report and "watchdog" not in report.split("Python stacks")[1]


def test_an_unknown_job_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["doctor", "no-such-job"])
    assert result.exit_code == 2
    assert result.stderr.startswith("onegpu: no job 'no-such-job' in") and len(result.stderr.splitlines()) == 1


def test_a_worker_answers_another_workers_request_with_its_records_and_stacks(tmp_path, monkeypatch):
    monkeypatch.setattr(flight, "_dumped", [])
    flight.answer_requests(tmp_path, rank=1)
    flight.request_dumps(tmp_path, rank=0)
    deadline = time.monotonic() + 10
    while not (tmp_path / "stacks" / "rank-1.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    record = json.loads((tmp_path / "flight" / "rank-1.json").read_text())
    assert record["rank"] == 1 and record["reason"] == "asked by rank 0"
    assert "test_a_worker_answers_another_workers_request" in (tmp_path / "stacks" / "rank-1.txt").read_text()
