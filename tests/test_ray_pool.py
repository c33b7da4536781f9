"""A pool that spans machines, on Ray: a cluster of 3 fake nodes with 2 device slots each (``ray.cluster_utils``),
its devices leased in the ledger and reserved as placement groups, one worker per device on its node."""

from __future__ import annotations

import getpass
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_same_parameters, assert_same_training, assert_same_values, run_onegpu
from elastic_training import STEPS, reference
from safetensors.torch import load_file
from scenarios import SkipNet, build, train

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
SLOTS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node without devices (Ray's own services) and 3 nodes of 2 ``onegpu_device`` slots; stopped however
    the tests end. Nodes are declared dead 3 s after they stop answering (Ray's default is 15-30 s)."""
    from ray.cluster_utils import Cluster

    health = {"health_check_failure_threshold": 3, "health_check_period_ms": 1000, "health_check_initial_delay_ms": 0}
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": health})
    try:
        nodes = [made.add_node(num_cpus=1, resources={"onegpu_device": SLOTS}) for _ in range(3)]
        ray.init(address=made.address, log_to_driver=False)
        yield made, nodes
    finally:
        ray.shutdown()
        made.shutdown()


@pytest.fixture
def pool(cluster, tmp_path):
    """ONEGPU_HOME with a pool.toml pointing at the cluster; the environment for ``run_onegpu``."""
    made, _ = cluster
    home = tmp_path / "home"
    home.mkdir()
    (home / "pool.toml").write_text(
        f'backend = "ray"\naddress = "{made.address}"\ndevice_resource = "onegpu_device"\nslot_memory_gb = 4\n'
    )
    return {"ONEGPU_HOME": str(home), "ONEGPU_LEASE_TTL": "6"}


def ledger_rows(env: dict, query: str) -> list[tuple]:
    with sqlite3.connect(Path(env["ONEGPU_HOME"]) / "ledger.sqlite") as db:
        return db.execute(query).fetchall()


def node_of_devices(env: dict) -> dict[int, str]:
    return {first + i: node for node, first, slots in ledger_rows(env, "SELECT node, first_device, slots FROM nodes")
            for i in range(slots)}  # fmt: skip


def wait_for(path: Path, *, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.2)


def start_onegpu(*args: str, env: dict) -> subprocess.Popen:
    import os

    return subprocess.Popen(
        [sys.executable, "-m", "onegpu", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={"OMP_NUM_THREADS": "1", **os.environ, **env},
    )  # fmt: skip


def test_smi_lists_the_nodes_and_flavors_count_every_node(pool):
    shown = json.loads(run_onegpu("smi", "--json", env=pool).stdout)
    assert [node["devices"] for node in shown["nodes"]] == [SLOTS] * 3
    assert len(shown["devices"]) == 3 * SLOTS and len({d["node"] for d in shown["devices"]}) == 3
    switched = run_onegpu("switch", "Large", env=pool)
    assert switched.returncode == 0 and "Large.16GB" in switched.stdout, switched.stderr
    assert "on 3 nodes (ray backend)" in run_onegpu("smi", env=pool).stdout


def test_a_job_over_two_nodes_trains_as_one_process_and_the_planner_sees_both_nodes(pool, tmp_path):
    out = tmp_path / "out"
    result = run_onegpu("run", "--workers", "4", "tests/scripts/ray_job.py", str(out), env=pool, timeout=300)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    for scenario, strategy in (("custom", "fsdp"), ("hf", "ddp")):
        ran = results[f"{scenario}-{strategy}"]
        assert ran["local_batch_sizes"] == [2] * 8  # rank 0's slice of 5 rows over 4 workers (2, 1, 1, 1)
        if scenario == "hf":
            from transformers import AutoModelForCausalLM

            trained = AutoModelForCausalLM.from_pretrained(out / f"{scenario}-{strategy}")
        else:
            trained, _ = build(scenario, layers=2)
            trained.load_state_dict(load_file(out / f"{scenario}-{strategy}" / "model.safetensors"))
        assert_same_training(ran, train(scenario), trained=trained)
    places = results["places"]
    assert [p["RANK"] for p in places] == ["0", "1", "2", "3"]
    assert [(p["GROUP_RANK"], p["LOCAL_RANK"], p["LOCAL_WORLD_SIZE"]) for p in places] == [
        ("0", "0", "2"), ("0", "1", "2"), ("1", "0", "2"), ("1", "1", "2")]  # fmt: skip
    node_of = node_of_devices(pool)
    devices = [int(p["ONEGPU_DEVICES"].split(",")[int(p["LOCAL_RANK"])]) for p in places]
    assert len({node_of[d] for d in devices[:2]}) == 1 and len({node_of[d] for d in devices}) == 2
    assert results["cluster"] == {"nodes": 2, "devices_per_node": 2}
    assert results["ray_in_worker"] is False
    intervals = ledger_rows(pool, "SELECT device FROM intervals")
    assert sorted(d for (d,) in intervals) == sorted(devices)  # one lease row per device, all released
    assert not ledger_rows(pool, "SELECT * FROM leases")
    assert not [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]


def test_two_jobs_never_share_a_device_a_third_is_told_the_pool_is_full_and_onegpu_cancel_stops_one(pool, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        out.mkdir()
    jobs = [start_onegpu("run", "--workers", "3", "tests/scripts/ray_hold.py", str(out), env=pool) for out in outs]
    try:
        for out, job in zip(outs, jobs):
            wait_for(out / "running", process=job)
        held = ledger_rows(pool, "SELECT device, job FROM leases")
        by_job = {}
        for device, job in held:
            by_job.setdefault(job, set()).add(device)
        assert sorted(map(len, by_job.values())) == [3, 3] and len(held) == 6
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
        node_of = node_of_devices(pool)
        for group in groups:  # Ray placed each bundle on its device's node, as the ledger chose
            job = group["name"].removeprefix("onegpu-")
            assert sorted(group["bundles_to_node_id"].values()) == sorted(node_of[d] for d in by_job[job])
        third = run_onegpu("run", "--workers", "1", "--no-wait", "tests/scripts/ray_hold.py", str(tmp_path), env=pool)
        assert third.returncode == 1 and third.stderr.startswith("onegpu: the pool cannot serve 1 device now")
        assert len(third.stderr.strip().splitlines()) == 1
        (outs[0] / "stop").write_text("")
        assert jobs[0].wait(timeout=120) == 0, jobs[0].communicate()[1]
        (second,) = {job for (job,) in ledger_rows(pool, "SELECT job FROM leases")}  # the job left running
        cancelled = run_onegpu("cancel", second, env=pool)
        assert cancelled.returncode == 0, cancelled.stderr
        _, said = jobs[1].communicate(timeout=120)
        assert (
            jobs[1].returncode == 1
            and said.strip().splitlines()[-1]
            == f"onegpu: job {second} was cancelled by {getpass.getuser()} with onegpu cancel"
        )
    finally:
        for job in jobs:
            job.kill()
    assert not ledger_rows(pool, "SELECT * FROM leases")


def test_a_lost_node_ends_its_leases_and_the_job_resumes_exactly_on_other_devices(pool, cluster, tmp_path):
    made, nodes = cluster
    out = tmp_path / "out"
    out.mkdir()
    job = start_onegpu(
        "run", "--workers", "4", "--max-restarts", "1", "tests/scripts/ray_node_loss.py", str(out), env=pool
    )
    try:
        wait_for(out / "lose-a-node", process=job)
        told = json.loads((out / "lose-a-node").read_text())
        name, node_of = told["job"], node_of_devices(pool)
        held = [d for (d,) in ledger_rows(pool, f"SELECT device FROM leases WHERE job = '{name}'")]
        lost_node = next(node_of[d] for d in held if node_of[d] != node_of[told["device"]])
        lost = {d for d in held if node_of[d] == lost_node}
        made.remove_node(next(n for n in nodes if n.node_id == lost_node), allow_graceful=False)
        removed = time.time()
        while {d for (d,) in ledger_rows(pool, f"SELECT device FROM leases WHERE job = '{name}'")} & lost:
            if time.time() - removed > 30:
                job.kill()
                raise AssertionError(f"the lost node's leases outlived it by 30 s: {job.communicate()[1]}")
            time.sleep(0.5)
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr
    finally:
        job.kill()
        nodes.append(made.add_node(num_cpus=1, resources={"onegpu_device": SLOTS}))  # the next test's pool is whole
    assert "of the Ray pool was lost: its leases ended" in stderr
    steps = {}
    for line in (out / "steps.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record
    assert sorted(steps) == list(range(STEPS)) and {r["world"] for r in steps.values()} == {4}
    assert steps[4]["attempt"] == 1  # resumed from step 3's state, on 2 devices kept and 2 from the third node
    losses, trained = reference()
    assert_same_values([steps[s]["loss"] for s in range(STEPS)], losses, what="per-step losses")
    resumed = SkipNet(depth=3)
    resumed.load_state_dict(load_file(out / "model" / "model.safetensors"))
    assert_same_parameters(resumed, trained)
    intervals = ledger_rows(pool, f"SELECT device, started, ended FROM intervals WHERE job = '{name}'")
    assert len(intervals) == 6  # 4 devices, 2 of them lost and replaced
    for device, _, ended in intervals:
        if device in lost:  # billed up to the loss, not up to when Ray noticed it
            assert removed - 5 < ended < removed + 10
    usage = json.loads(run_onegpu("usage", "--json", env=pool).stdout)
    from onegpu.pool.ledger import Interval

    billed = sum(Interval(name, "", d, start, end).billed_minutes for d, start, end in intervals)
    assert usage["total_device_minutes"] == billed
