"""Launching a job three ways, and what a user sees when a job or its input is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from conftest import ROOT, run_onegpu

JOB = "tests/scripts/job.py"
pytestmark = pytest.mark.slow


def no_process_left(tag: str) -> bool:
    found = subprocess.run(["pgrep", "-f", tag], capture_output=True, text=True)
    return found.stdout.strip() == ""


def test_onegpu_run_shows_printed_lines_once():
    result = run_onegpu("run", "--workers", "2", JOB, "ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hello from rank 0 of 2"]
    assert "strategy: ddp" in result.stderr
    assert "find_unused_parameters" not in result.stderr  # DDP's reducer's warning on onegpu's own choice


def test_plain_python_with_init_starts_the_workers():
    result = subprocess.run(
        [sys.executable, JOB, "ok"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ONEGPU_WORKERS": "2"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hello from rank 0 of 2"]


def test_external_torchrun_launch_is_respected():
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", JOB, "ok"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    # both workers print (torchrun's own choice); their lines may interleave in one pipe
    assert result.stdout.count("hello from rank 0 of 2") == 1 and result.stdout.count("hello from rank 1 of 2") == 1


def test_a_crashing_worker_stops_the_job_with_its_traceback():
    tag = f"crash-{uuid.uuid4().hex}"
    started = time.monotonic()
    result = run_onegpu("run", "--workers", "2", JOB, "crash", tag)
    assert result.returncode != 0
    assert time.monotonic() - started < 90  # not the collective timeout: torchelastic stops the job at once
    assert "RuntimeError: boom on rank 1" in result.stderr  # the worker's own traceback
    assert (
        result.stderr.strip().splitlines()[-1]
        == "onegpu: worker rank 1 failed (exit code 1): RuntimeError: boom on rank 1"
    )
    assert no_process_left(tag)


def test_a_worker_stuck_in_a_collective_names_the_worker_it_waits_for_and_the_phase():
    tag = f"hang-{uuid.uuid4().hex}"
    result = run_onegpu("run", "--workers", "2", JOB, "hang", tag, env={"ONEGPU_COLLECTIVE_TIMEOUT": "3"})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("onegpu: rank 1 is behind: rank 0 waits in "), last
    assert "(forward)" in last and "rank 1's last collective is" in last and "ONEGPU_COLLECTIVE_TIMEOUT" in last, last
    assert no_process_left(tag)


def test_a_batch_smaller_than_the_worker_count_is_a_one_line_error():
    result = run_onegpu("run", "--workers", "3", JOB, "tiny-batch")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "onegpu: a global batch of 2 samples cannot be split among 3 workers: use a batch size of at "
        "least 3, fewer workers, or drop_last=True for a short last batch"
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["run", "missing.py"],
            {},
            "onegpu: script 'missing.py' not found: give the path of a Python file, e.g. onegpu run train.py",
        ),
        (["run", "--workers", "0", JOB], {}, "onegpu: --workers 0: a job needs at least 1 worker"),
        (
            ["run", JOB],
            {"ONEGPU_WORKERS": "two"},
            "onegpu: ONEGPU_WORKERS='two' is not a whole number: set it to the number of workers, e.g. 2",
        ),
    ],
)
def test_bad_launch_arguments_give_one_line(args, env, message):
    result = run_onegpu(*args, env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == message
