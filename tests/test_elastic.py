"""Jobs that survive a dead worker and change size while they run: ``onegpu run --max-restarts``, ``onegpu
resize``, ``onegpu switch --job``, and what usage bills for them."""

from __future__ import annotations

import json
import re
import socket

import pytest
from conftest import assert_same_parameters, assert_same_values, run_onegpu
from elastic_training import STEPS, reference
from scenarios import SkipNet

from onegpu.errors import UsageError
from onegpu.pool.ledger import Interval


@pytest.mark.slow
def test_a_job_resized_2_3_2_with_a_worker_killed_on_3_trains_as_one_uninterrupted_process(tmp_path):
    from safetensors.torch import load_file

    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    (home / "pool.toml").write_text("cpu_slots = 4\nslot_memory_gb = 2\n")
    env = {"ONEGPU_HOME": str(home)}
    result = run_onegpu(
        "run", "--workers", "2", "--max-restarts", "1", "tests/scripts/elastic_job.py", str(out), env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "moves to 3 devices at its next step boundary" in result.stderr
    assert "moves to 2 devices at its next step boundary" in result.stderr
    assert "onegpu: a worker failed: all workers started again (restart 1 of 1)" in result.stderr
    steps = {}
    for line in (out / "steps.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record  # a step run again after the restart counts as run last
    assert sorted(steps) == list(range(STEPS))
    assert [steps[s]["world"] for s in range(STEPS)] == [2] * 4 + [3] * 4 + [2] * 4
    assert steps[5]["attempt"] == 1  # torchelastic restarted the 3 workers once, after the SIGKILL
    losses, trained = reference()
    assert_same_values([steps[s]["loss"] for s in range(STEPS)], losses, what="per-step losses")
    resumed = SkipNet(depth=3)
    resumed.load_state_dict(load_file(out / "model" / "model.safetensors"))
    assert_same_parameters(resumed, trained)
    usage = json.loads(run_onegpu("usage", "--by", "interval", "--json", env=env).stdout)
    # one lease interval per size: the restart kept the devices, and each size is billed at its own
    assert [row["devices"] for row in usage["rows"]] == [2, 3, 2]
    assert len({row["job"] for row in usage["rows"]}) == 1
    (directory,) = (home / "jobs").iterdir()  # kept as the job's record, without the resize requests
    record = json.loads((directory / "job.json").read_text())
    assert [r["workers"] for r in record["resizes"]] == [3, 2] and record["workers"] == 2 and record["exit"] == 0
    assert not {"resize", "resized"} & {p.name for p in directory.iterdir()}
    ledger = json.loads(run_onegpu("smi", "--json", env=env).stdout)
    assert all(device["job"] is None for device in ledger["devices"])


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A pool of 4 CPU slots, in a home of the test's own."""
    (tmp_path / "pool.toml").write_text("cpu_slots = 4\nslot_memory_gb = 2\n")
    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path))
    return tmp_path


def test_a_resized_job_keeps_its_devices_and_usage_shows_each_size_with_the_minutes_begun_in_it(home):
    from onegpu.cli.usage import sized_intervals
    from onegpu.pool.config import load_pool
    from onegpu.pool.lease import JobLease, pool_ledger, resize_lease

    pool = load_pool()
    ledger = pool_ledger(pool)
    lease = JobLease(job="alice-1", devices=ledger.acquire(job="alice-1", devices=2, pool_devices=range(4)), pool=pool)
    grown = resize_lease(lease, count=3)
    shrunk = resize_lease(grown, count=1)
    assert (grown.devices, shrunk.devices) == ((0, 1, 2), (0,))
    assert [h.devices for h in ledger.holdings()] == [(0,)]  # the kept device was never released
    ledger.release(job="alice-1")
    intervals = ledger.intervals()
    assert len(intervals) == 3  # one per device: device 0 held throughout
    stretches = sized_intervals(intervals)
    assert [s.devices for s in stretches] == [2, 3, 1]
    assert sum(s.billed_minutes() for s in stretches) == sum(i.billed_minutes for i in intervals)


def test_a_job_restarted_on_the_same_devices_is_one_stretch_and_another_job_is_apart():
    from onegpu.cli.usage import sized_intervals

    def held(job, device, start, end):
        return Interval(job=job, user="u", device=device, start=start, end=end)

    stretches = sized_intervals(
        [held("a", 0, 0, 600), held("a", 1, 0, 600), held("b", 2, 100, 200), held("a", 2, 300, 400)]
    )
    assert [(s.job, s.start, s.end, s.devices) for s in stretches] == [
        ("a", 0, 300, 2), ("b", 100, 200, 1), ("a", 300, 400, 3), ("a", 400, 600, 2)
    ]  # fmt: skip
    # the minutes each device began in a stretch: 2 x 5; 2 x 2 (at 300 and 360 s) + device 2's 2; 2 x 3
    assert [s.billed_minutes() for s in stretches if s.job == "a"] == [10, 6, 6]


def test_only_a_running_job_that_saves_its_state_on_this_machine_can_be_resized(home):
    from onegpu.cli.resize import resize_job
    from onegpu.launch.resizing import jobs_directory, mark_saves_state, requested_workers
    from onegpu.pool.config import load_pool
    from onegpu.pool.lease import pool_ledger

    pool = load_pool()
    pool_ledger(pool).acquire(job="alice-2", devices=2, pool_devices=range(4))
    directory = jobs_directory() / "alice-2"
    directory.mkdir(parents=True)
    with pytest.raises(UsageError, match="job alice-2 cannot be resized: it does not save its state"):
        resize_job(pool, job="alice-2", workers=3)
    assert requested_workers(directory) is None  # nothing asked
    mark_saves_state(directory, state=home / "ckpt")
    resize_job(pool, job="alice-2", workers=3)
    assert requested_workers(directory) == 3
    pool_ledger(pool).acquire(job="bob-1", devices=1, pool_devices=range(4))
    with pytest.raises(
        UsageError, match=f"job bob-1 runs on {re.escape(socket.gethostname())}: run onegpu resize there"
    ):
        _on_another_host(lambda: resize_job(pool, job="bob-1", workers=2))


def _on_another_host(call):
    import unittest.mock

    with unittest.mock.patch("onegpu.cli.resize.socket.gethostname", return_value="elsewhere"):
        return call()


def test_each_attempt_of_a_restarted_job_leaves_its_own_status(home, monkeypatch):
    from onegpu.launch.status import attempt_directory, endings, record_end

    status = home / "status"
    status.mkdir()
    monkeypatch.setenv("ONEGPU_STATUS_DIR", str(status))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    record_end(rank=1, code=0)  # the first attempt's rank 1 ended early
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert endings() == []  # the second attempt's workers see none of it
    record_end(rank=0, code=3)
    assert [(e.rank, e.code) for e in endings(attempt_directory(status, 1))] == [(0, 3)]
    assert [(e.rank, e.code) for e in endings(attempt_directory(status, 0))] == [(1, 0)]


def test_a_loop_drawing_its_own_batches_stops_at_the_next_call_and_resumes_exactly(home, monkeypatch):
    """One worker, in this process, a Hugging Face Llama on token batches the loop draws itself: the job asked to
    resize after step 2 saves at step 3's end (its scheduler stepped, its random state before step 4's batch was
    drawn) and ends at step 4's call; a new run continues from there."""
    import torch
    from scenarios import build

    import onegpu
    from onegpu.launch.resizing import request_resize, take_resize

    status = home / "status"
    status.mkdir()

    def run(*, prepare, losses: dict, ask_after: int | None = None) -> None:
        model, _ = build("hf")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        start = None
        if prepare:
            model, optimizer, scheduler = onegpu.prepare(model, optimizer, scheduler)
            start = onegpu.load_state(home / "state")
        for step in range(start or 0, 8):
            tokens = torch.randint(0, 64, (4, 12))  # drawn by the loop from torch's random state
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            losses[step] = loss.item()
            if step == ask_after:
                request_resize(status, workers=2)

    expected: dict[int, float] = {}
    run(prepare=False, losses=expected)
    monkeypatch.setenv("ONEGPU_STATUS_DIR", str(status))  # as under onegpu run
    losses: dict[int, float] = {}
    with pytest.raises(SystemExit) as ended:
        run(prepare=True, losses=losses, ask_after=2)
    assert ended.value.code == 0 and sorted(losses) == [0, 1, 2, 3]
    assert take_resize(status) == 2  # what the launcher reads: start again on 2 workers
    run(prepare=True, losses=losses)
    assert_same_values([losses[s] for s in range(8)], [expected[s] for s in range(8)], what="per-step losses")
