"""What a job does once a node of its pool is lost (launch/ray_run.py), on the ledger alone: the lost devices' leases
end at the loss, and the job takes other devices if the pool has them free now, else goes on with the ones it has
left. The whole path, with a real Ray cluster and a node removed, is in tests/test_ray_pool.py."""

from __future__ import annotations

import time

import pytest

from onegpu.launch.ray_run import Outcome, _drop_lost, _replace_lost
from onegpu.pool.config import load_pool
from onegpu.pool.lease import JobLease, pool_ledger
from onegpu.pool.ledger import fewest_nodes


@pytest.fixture
def lease(tmp_path, monkeypatch):
    """A job holding all 4 devices of a pool of 4 CPU slots."""
    (tmp_path / "pool.toml").write_text("cpu_slots = 4\nslot_memory_gb = 2\n")
    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path))
    pool = load_pool()
    devices = pool_ledger(pool).acquire(job="alice-1", devices=4, pool_devices=pool.node_of())
    return JobLease(job="alice-1", devices=devices, pool=pool)


def test_a_lost_nodes_leases_end_at_the_loss_and_the_others_run_on(lease):
    loss = time.time()
    time.sleep(0.5)  # Ray declares the node dead after the first worker failed for it
    left = _drop_lost(lease, Outcome(failures=[], lost={"node-b": (2, 3)}, first_failure_s=loss))
    assert left.devices == (0, 1)
    ledger = pool_ledger(lease.pool)
    assert [h.devices for h in ledger.holdings()] == [(0, 1)]
    assert sorted((i.device, i.end) for i in ledger.intervals() if i.device in (2, 3)) == [(2, loss), (3, loss)]


def test_a_job_that_lost_devices_takes_free_ones_at_once(lease):
    left = _drop_lost(lease, Outcome(failures=[], lost={"node-b": (2, 3)}, first_failure_s=None))
    assert sorted(_replace_lost(left, wanted=4, lost=set()).devices) == [0, 1, 2, 3]


def test_a_job_that_lost_devices_goes_on_with_the_ones_left_when_the_pool_is_full(lease, capsys):
    left = _drop_lost(lease, Outcome(failures=[], lost={"node-b": (2, 3)}, first_failure_s=None))
    pool_ledger(lease.pool).acquire(job="bob-1", devices=2, pool_devices=lease.pool.node_of())
    assert _replace_lost(left, wanted=4, lost=set()).devices == (0, 1)
    assert "onegpu: going on with 2 of 4 devices" in capsys.readouterr().err
    assert not [h for h in pool_ledger(lease.pool).holdings() if h.job == "alice-1" and len(h.devices) != 2]


def test_devices_of_a_node_not_yet_declared_dead_are_not_taken_again(lease):
    left = _drop_lost(lease, Outcome(failures=[], lost={"this-host": (2, 3)}, first_failure_s=None))
    assert _replace_lost(left, wanted=4, lost={lease.pool.devices[0].node}).devices == (0, 1)


def test_a_jobs_devices_are_chosen_on_as_few_nodes_as_can_hold_them():
    node_of = {0: "a", 1: "a", 2: "b", 3: "b", 4: "b", 5: "c", 6: "c", 7: "c", 8: "c"}
    assert fewest_nodes([0, 1, 2, 3, 4, 5, 6, 7, 8], node_of=node_of, count=3) == (2, 3, 4)  # the tightest fit
    assert fewest_nodes([0, 1, 2, 3, 4, 5, 6, 7, 8], node_of=node_of, count=6) == (5, 6, 7, 8, 2, 3)
    assert fewest_nodes([1, 3, 8], node_of=node_of, count=2) == (1, 3)
