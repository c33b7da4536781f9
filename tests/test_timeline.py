"""A pipelined job's measured timeline: every worker's forward, backward and messages per micro-batch, as a
Chrome trace with the measured bubble next to the predicted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import launch_script
from typer.testing import CliRunner

from onegpu.cli import app
from onegpu.plan import Plan, Prediction
from onegpu.report import timeline as timeline_module
from onegpu.report.timeline import read_timeline, schedule_bubble

MS = 1_000_000  # nanoseconds


def write_records(directory: Path, events: dict[int, list[tuple]], *, hosts=("a", "a"), clocks=(0, 0)) -> None:
    """Timeline files of a 2-worker GPipe job: ``events[rank]`` as (kind, microbatch, start ms, end ms); each
    worker's clock reads ``clocks[rank]`` ms more than the true time."""
    (directory / "timeline").mkdir(parents=True, exist_ok=True)
    for rank, rows in events.items():
        record = {
            "rank": rank, "host": hosts[rank], "stages": [rank], "pp": 2, "num_stages": 2, "schedule": "gpipe",
            "microbatches": 4, "device": "cpu", "synchronized": False, "barrier_ns": (100 + clocks[rank]) * MS,
            "steps": [{"step": 2, "start_ns": 0, "end_ns": 0}],
            "events": [{"kind": kind, "stage": rank, "microbatch": mb, "step": 2, "start_ns": (start + clocks[rank]) * MS,
                        "end_ns": (end + clocks[rank]) * MS} for kind, mb, start, end in rows],
        }  # fmt: skip
        (directory / "timeline" / f"rank-{rank}.json").write_text(json.dumps(record))


def ideal_gpipe() -> dict[int, list[tuple]]:
    """GPipe on 2 balanced stages, forward 1 ms and backward 2 ms, messages free: 3 of 15 ms idle per worker."""
    first = [("forward", i, 1000 + i, 1001 + i) for i in range(4)] + [
        ("backward", i, 1007 + 2 * i, 1009 + 2 * i) for i in range(4)
    ]
    last = [("forward", i, 1001 + i, 1002 + i) for i in range(4)] + [
        ("backward", i, 1005 + 2 * i, 1007 + 2 * i) for i in range(4)
    ]
    return {0: first, 1: last}


def test_a_balanced_pipeline_idles_as_the_schedule_says(tmp_path):
    write_records(tmp_path, ideal_gpipe())
    trace = read_timeline(tmp_path)
    assert trace["otherData"]["bubble_measured"] == pytest.approx(0.2)
    assert trace["otherData"]["bubble_predicted"] == pytest.approx(0.2)  # (pp - 1) / (m + pp - 1)
    assert trace["otherData"]["bubble_predicted_from"] == "schedule theory"


def test_the_trace_is_a_chrome_trace_one_process_per_worker(tmp_path):
    write_records(tmp_path, ideal_gpipe())
    trace = json.loads(json.dumps(read_timeline(tmp_path)))
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "rank 0 (stage 0)", 1: "rank 1 (stage 1)"}
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(slices) == 16
    first = min(slices, key=lambda e: e["ts"])
    assert (first["pid"], first["name"], first["ts"], first["dur"]) == (0, "F0", 0, 1000)  # µs from the first
    assert first["args"] == {"microbatch": 0, "stage": 0, "step": 2}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert {threads[e["pid"], e["tid"]] for e in slices} == {"forward", "backward"}


def test_clocks_of_several_hosts_are_aligned_at_the_barrier(tmp_path):
    write_records(tmp_path, ideal_gpipe(), hosts=("a", "b"), clocks=(0, 250))
    trace = read_timeline(tmp_path)
    assert trace["otherData"]["bubble_measured"] == pytest.approx(0.2)
    assert trace["otherData"]["clocks"] == "several hosts: aligned at a barrier"


def test_the_cost_models_bubble_is_preferred_when_the_plan_has_it(tmp_path, monkeypatch):
    write_records(tmp_path, ideal_gpipe())
    times = {"compute": 0.8, "pipeline_bubble": 0.3, "pipeline_comm": 0.1, "optimizer": 5.0}
    predicted = Prediction(1, 1, 1, 0.1, 1, {}, time_breakdown=times)
    monkeypatch.setattr(timeline_module, "read_plan", lambda directory: Plan(dp=1, predicted=predicted))
    info = read_timeline(tmp_path)["otherData"]
    assert info["bubble_predicted"] == pytest.approx(0.25)  # of the pipeline's time, not the optimizer's
    assert info["bubble_predicted_from"] == "cost model (plan.json)"


def test_schedule_theory():
    assert schedule_bubble("1f1b", pp=4, microbatches=8) == pytest.approx(3 / 11)
    assert schedule_bubble("interleaved", pp=2, microbatches=4) == pytest.approx(1 / 9)  # (p-1) / (v m + p - 1)
    assert schedule_bubble("zero-bubble", pp=4, microbatches=4) < schedule_bubble("interleaved", pp=4, microbatches=4)


def test_a_job_without_a_timeline_reads_none(tmp_path):
    assert read_timeline(tmp_path) is None


def test_the_cli_writes_the_trace_or_says_why_not_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path / "home"))
    write_records(tmp_path / "home" / "jobs" / "piped", ideal_gpipe())
    (tmp_path / "home" / "jobs" / "flat").mkdir()
    out = tmp_path / "trace.json"
    result = CliRunner().invoke(app, ["timeline", "piped", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "bubble measured 20.0%, predicted 20.0% (schedule theory)" in result.output
    assert json.loads(out.read_text())["otherData"]["schedule"] == "gpipe"
    for job, says in (("nope", "no job 'nope'"), ("flat", "job flat recorded no pipeline timeline")):
        result = CliRunner().invoke(app, ["timeline", job, "-o", str(tmp_path / "other.json")])
        assert result.exit_code == 1 and result.output.count("\n") == 1 and says in result.output
        assert not (tmp_path / "other.json").exists()


# --- measured on real workers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One job: 1F1B on a balanced stack, the stack interleaved, and a model cut from its traced graph (GPipe)."""
    out, _ = launch_script(tmp_path_factory, "pipeline_timeline.py", workers=2)
    return {name: read_timeline(out / name) for name in ("1f1b", "interleaved", "tower")}


def computations(trace: dict, *, pid: int, step: int) -> list[str]:
    """A worker's computations in one recorded call, in the order they started: "F0", "B0", ..."""
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == pid and e["args"]["step"] == step]
    return [e["name"] for e in sorted(slices, key=lambda e: e["ts"]) if e["cat"] in ("forward", "backward")]


def span(trace: dict, *, pid: int, name: str, step: int) -> tuple[float, float]:
    (e,) = [
        e
        for e in trace["traceEvents"]
        if e.get("pid") == pid and e["name"] == name and e.get("args", {}).get("step") == step
    ]
    return e["ts"], e["ts"] + e["dur"]


@pytest.mark.slow
def test_every_worker_records_each_micro_batch_in_the_order_of_its_schedule(recorded):
    trace = recorded["1f1b"]
    assert trace["otherData"]["steps"] == [2, 3, 4]  # after the first call, a bounded few
    for step in (2, 3, 4):
        for pid in (0, 1):
            done = computations(trace, pid=pid, step=step)
            assert sorted(done) == ["B0", "B1", "B2", "B3", "F0", "F1", "F2", "F3"]
        assert computations(trace, pid=0, step=step) == ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"]  # 1F1B
        for i in range(4):  # a micro-batch's forward reaches the last stage, its backward comes back
            assert span(trace, pid=0, name=f"F{i}", step=step)[1] <= span(trace, pid=1, name=f"F{i}", step=step)[0]
            assert span(trace, pid=1, name=f"F{i}", step=step)[1] <= span(trace, pid=1, name=f"B{i}", step=step)[0]
            assert span(trace, pid=1, name=f"B{i}", step=step)[1] <= span(trace, pid=0, name=f"B{i}", step=step)[0]
            assert span(trace, pid=1, name=f"recv F{i}", step=step)[1] <= span(trace, pid=1, name=f"F{i}", step=step)[0]


@pytest.mark.slow
def test_the_measured_bubble_is_near_the_schedules_on_a_balanced_model(recorded):
    info = recorded["1f1b"]["otherData"]
    assert info["bubble_predicted"] == pytest.approx(0.2)
    # balanced stages idle at least the theory's share (less only by timing noise); messages, the schedule's own
    # work and, on a shared 2-core machine, the other worker taking the core add to it (0.32 seen under load 7)
    assert info["bubble_predicted"] - 0.05 < info["bubble_measured"] < info["bubble_predicted"] + 0.25


@pytest.mark.slow
def test_interleaved_and_traced_graph_pipelines_are_recorded(recorded):
    interleaved, tower = recorded["interleaved"], recorded["tower"]
    names = {e["pid"]: e["args"]["name"] for e in interleaved["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "rank 0 (stages 0, 2)", 1: "rank 1 (stages 1, 3)"}
    for pid in (0, 1):
        done = [e for e in interleaved["traceEvents"] if e["ph"] == "X" and e["pid"] == pid and e["args"]["step"] == 2]
        per_stage = {(e["args"]["stage"], e["name"]) for e in done if e["cat"] in ("forward", "backward")}
        assert len(per_stage) == 2 * 8  # two stages, a forward and a backward of each micro-batch
        order = computations(tower, pid=pid, step=2)  # GPipe: every forward, then every backward
        assert order == ["F0", "F1", "F2", "F3", "B0", "B1", "B2", "B3"]
    for trace in (interleaved, tower):
        assert 0 < trace["otherData"]["bubble_measured"] < 1
