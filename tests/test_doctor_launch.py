"""A real job in which one worker skips one all-reduce: the job's line and ``onegpu doctor`` name it, with its
sequence gap, and show every worker's stack (tests/scripts/skip_all_reduce.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run_onegpu

from onegpu.report.doctor import diagnose

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hung(tmp_path_factory) -> tuple[str, str, Path]:
    """The job's last line on stderr, `onegpu doctor`'s output, and the job's directory."""
    home = tmp_path_factory.mktemp("home")
    env = {"ONEGPU_HOME": str(home), "ONEGPU_COLLECTIVE_TIMEOUT": "3"}
    result = run_onegpu("run", "--workers", "2", "tests/scripts/skip_all_reduce.py", env=env)
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    job = re.search(r"run `onegpu doctor (\S+)`", line)
    assert job is not None, line
    directory = home / "jobs" / job[1]
    return line, diagnose(directory), directory  # the command itself: tests/test_doctor.py


def test_the_jobs_line_names_the_rank_that_skipped_with_its_sequence_gap(hung):
    line, _, directory = hung
    waits = re.search(
        r"^onegpu: rank 1 is behind: rank 0 waits in all_reduce #(\d+); rank 1's last collective is "
        r"all_reduce #(\d+) \(1 behind\); stacks in (\S+); run `onegpu doctor",
        line,
    )
    assert waits is not None, line
    assert int(waits[1]) == int(waits[2]) + 1 and Path(waits[3]) == directory / "stacks"
    assert "ONEGPU_COLLECTIVE_TIMEOUT" in line


def test_doctor_shows_each_workers_collectives_and_the_gap(hung):
    _, report, _ = hung
    assert report.startswith("hang: rank 1 is behind: rank 0 waits in all_reduce #")
    reached = re.search(r"Sequence numbers reached: rank 0 #(\d+), rank 1 #(\d+)\. Behind: rank 1 by 1\.", report)
    assert reached is not None, report
    assert int(reached[2]) == int(reached[1]) - 1
    assert report.count("WAITING") == 1  # rank 0, in the all-reduce rank 1 skipped


def test_doctor_shows_every_workers_stack_and_where_the_skipping_one_is(hung):
    _, report, directory = hung
    stacks = report.split("Python stacks")[1]
    rank0, rank1 = stacks.split("  rank 0:")[1].split("  rank 1:")
    assert "skip_all_reduce.py:32 in <module>: dist.all_reduce(logged)" in rank0
    assert "skip_all_reduce.py:19 in write_summary_alone: time.sleep(600)" in rank1
    assert sorted(p.name for p in (directory / "stacks").iterdir()) == ["rank-0.txt", "rank-1.txt"]
