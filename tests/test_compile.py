"""torch.compile per repeated block (``Plan.compile``): a compiled plan trains like a plain eager process.

Inductor's CPU kernels (fused, vectorised) change fp32 rounding no more than another reduction order does,
so the one tolerance policy of conftest.py holds unchanged.
"""

import pytest
import torch
from conftest import assert_same_training, launch_script
from scenarios import train
from test_single_device_equivalence import load_checkpoint

from onegpu.parallel.compile import CompiledForward, apply_compile
from onegpu.plan import Plan


def compiled_blocks(model: torch.nn.Module) -> int:
    return sum(isinstance(m.__dict__.get("forward"), CompiledForward) for m in model.modules())


@pytest.mark.parametrize("scenario", ["hf", "custom"])
def test_one_worker_with_compiled_blocks_trains_like_plain_eager_pytorch(scenario):
    import onegpu

    run = train(scenario, prepare=onegpu.prepare, plan=Plan(dp=1, compile=True))
    assert compiled_blocks(run["model"]) == (2 if scenario == "hf" else 3)
    assert_same_training(run, train(scenario), trained=run["model"])


@pytest.fixture(scope="module")
def compiled_runs(tmp_path_factory):
    return launch_script(tmp_path_factory, "train_compiled.py", workers=2)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["hf", "custom"])  # replicated, and sharded (FSDP2 around the compiled blocks)
def test_two_workers_with_compiled_blocks_train_like_plain_eager_pytorch(compiled_runs, scenario):
    out, results = compiled_runs
    assert results[scenario].pop("compiled") == (2 if scenario == "hf" else 3)
    assert_same_training(results[scenario], train(scenario), trained=load_checkpoint(scenario, out / scenario))


def test_a_block_dynamo_cannot_capture_whole_is_compiled_with_graph_breaks():
    class Chatty(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            torch._dynamo.graph_break()  # what an unsupported call (a C extension, a data-dependent branch) causes
            return self.fc(x) * 2

    block, plain = Chatty(), Chatty()
    plain.load_state_dict(block.state_dict())
    apply_compile([block])
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"Chatty cannot be compiled as one graph .*compiling it with graph breaks"):
        out = block(x)
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    assert not block.forward.fullgraph


# --- the planner: compile is chosen from a measurement on the job's devices, never on a guess ---


def test_a_plan_carries_compile_through_json_and_says_so():
    from onegpu.errors import UsageError

    plan = Plan(dp=2, compile=True)
    assert Plan.from_json(plan.to_json()) == plan and "compiled blocks" in plan.describe()
    assert Plan.from_dict({"dp": 2}).compile is False  # plans written before compile existed
    with pytest.raises(UsageError, match=r"^Plan.compile must be True or False, got 'yes'$"):
        Plan(dp=1, compile="yes")


@pytest.mark.parametrize(("pinned", "measured", "compiled"), [
    (None, None, False), (None, 0.99, False), (None, 0.6, True), (False, 0.6, False), (True, None, True),
])  # fmt: skip
def test_the_search_compiles_only_when_pinned_or_measured_faster(pinned, measured, compiled):
    from test_planner_search import cluster, transformer

    from onegpu.planner.search import find_plan

    job = dict(global_batch_size=16, seq_len=2048, cluster=cluster(nodes=1, per_node=8, memory_gb=80))
    job |= dict(dp=8, microbatches=1, sharding="parameters", activation_checkpointing="none", mixed_precision="bf16")
    eager = find_plan(transformer(layers=24, hidden=2048), **job)
    chosen = find_plan(transformer(layers=24, hidden=2048), **job, compiled_block_time=measured, compile=pinned)
    assert chosen.compile is compiled
    eager_compute, compute = (p.predicted.time_breakdown["compute"] for p in (eager, chosen))
    if compiled and measured is not None:  # the blocks' share of it (not the embedding and the head) is faster
        assert measured * eager_compute < compute < (measured + 0.1) * eager_compute
    else:
        assert compute == eager_compute


def test_the_compile_pin_takes_true_or_false():
    from onegpu.errors import UsageError
    from onegpu.planner.pins import parse_pins

    assert [parse_pins(compile=v).compile for v in ("true", "FALSE", True, "off")] == [True, False, True, False]
    with pytest.raises(UsageError, match=r"^compile='maybe': use true or false$"):
        parse_pins(compile="maybe")


def test_the_compiled_block_time_is_measured_once_per_device_and_block(tmp_path, monkeypatch):
    from scenarios import build

    from onegpu.planner import compile_measure

    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path))
    model, data = build("custom")
    batch = torch.utils.data.default_collate([data[i] for i in range(3)])
    measured = compile_measure.compiled_block_time(model, batch, blocks="blocks", device=torch.device("cpu"))
    assert measured > 0 and len(list((tmp_path / "cache").glob("compile-*.json"))) == 1
    monkeypatch.setattr(compile_measure, "_fastest", lambda *a, **k: pytest.fail("measured again"))
    again = compile_measure.compiled_block_time(model, batch, blocks="blocks", device=torch.device("cpu"))
    assert again == measured
    with torch.device("meta"):
        on_meta, _ = build("custom")
    assert compile_measure.compiled_block_time(on_meta, batch, blocks="blocks", device=torch.device("cpu")) is None


@pytest.mark.parametrize(("measured", "compiled"), [(0.5, True), (None, False)])
def test_advanced_parallelization_compiles_what_it_measured_faster_on_the_job_device(monkeypatch, measured, compiled):
    import onegpu
    from onegpu.planner import compile_measure

    seen = []

    def measure(model, batch, *, blocks, device):
        seen.append((blocks, device.type, len(batch[0])))
        return measured, None  # compiled over eager; the eager block's seconds (not measured here)

    monkeypatch.setenv("ONEGPU_MEASURE_COMPILE", "1")
    monkeypatch.setattr(compile_measure, "block_times", measure)
    onegpu.enable_advanced_parallelization()
    try:
        run = train("custom", prepare=onegpu.prepare, evaluate=False)
    finally:
        onegpu.disable_advanced_parallelization()
    assert seen == [("blocks", "cpu", 5)]  # one worker's slice of the first batch, on its device
    assert run["model"].onegpu_plan.compile is compiled
    assert compiled_blocks(run["model"]) == (3 if compiled else 0)


@pytest.mark.slow
def test_a_job_over_two_nodes_measures_the_link_across_them(compiled_runs):
    _, results = compiled_runs
    measured = results["two nodes"]  # each of the 2 workers taken as a node of its own
    assert (measured["nodes"], measured["devices_per_node"]) == (2, 1)
    assert measured["inter_node"]["bandwidth_gbps"] > 0 and measured["inter_node"]["latency_us"] > 0
    assert measured["device"]["peak_tflops"]["fp32"] > 0
