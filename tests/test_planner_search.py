"""The search: never an infeasible plan, pins honoured, a stable JSON shape, errors that say what would fit."""

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onegpu
from onegpu.errors import UsageError
from onegpu.plan import Plan
from onegpu.planner.cluster import Cluster, DeviceSpec, Link, load_cluster
from onegpu.planner.cost_model import Workload, memory
from onegpu.planner.profile import ModelProfile, PartProfile
from onegpu.planner.search import NoPlanFits, find_plan
from onegpu.planner.stages import flops_cuts, worker_stage_blocks


def transformer(*, layers: int, hidden: int, seq: int = 2048, vocab: int = 32000, heads: int = 32) -> ModelProfile:
    """A dense transformer profile from the textbook formulas (bf16 activations, flash attention)."""
    params = 12 * hidden * hidden
    flops = 2 * params * seq + 4 * seq * seq * hidden
    block = PartProfile(
        params=params,
        fwd_flops=flops,
        bwd_flops=2 * flops,
        activation_bytes=34 * seq * hidden,
        boundary_bytes=2 * seq * hidden,
    )
    head = PartProfile(
        params=2 * vocab * hidden,
        fwd_flops=2 * vocab * hidden * seq,
        bwd_flops=4 * vocab * hidden * seq,
        activation_bytes=6 * seq * vocab,
        boundary_bytes=0,
    )
    return ModelProfile(
        name=f"t{layers}x{hidden}",
        seq_len=seq,
        precision="bf16",
        blocks=(block,) * layers,
        rest=head,
        param_bytes=2,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        vocab_size=vocab,
    )


def cluster(*, nodes: int, per_node: int, memory_gb: float) -> Cluster:
    device = DeviceSpec(
        name="gpu", memory_gb=memory_gb, peak_tflops={"bf16": 300, "fp32": 20}, memory_bandwidth_gbps=2000
    )
    return Cluster(
        device=device,
        nodes=nodes,
        devices_per_node=per_node,
        intra_node=Link(bandwidth_gbps=300, latency_us=3),
        inter_node=Link(bandwidth_gbps=25, latency_us=5),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.sampled_from([2, 8, 24, 48]),
    hidden=st.sampled_from([512, 2048, 4096, 8192]),
    nodes=st.sampled_from([1, 2, 4]),
    per_node=st.sampled_from([1, 2, 8]),
    memory_gb=st.sampled_from([16, 40, 80]),
    batch=st.sampled_from([8, 32, 64, 256]),
)
def test_the_chosen_plan_and_its_alternatives_always_fit(layers, hidden, nodes, per_node, memory_gb, batch):
    profile, devices = (
        transformer(layers=layers, hidden=hidden),
        cluster(nodes=nodes, per_node=per_node, memory_gb=memory_gb),
    )
    budget = 0.9 * devices.memory_bytes
    try:
        chosen = find_plan(profile, global_batch_size=batch, seq_len=2048, cluster=devices)
    except NoPlanFits as error:
        assert "smallest needs" in str(error)
        return
    except UsageError as error:  # a batch that no data-parallel degree divides
        assert "cannot be split" in str(error)
        return
    for candidate in (chosen, *chosen.alternatives):
        assert candidate.world_size == devices.world_size
        assert candidate.predicted.memory_per_device_bytes <= budget
        recount = sum(memory(candidate, Workload(profile=profile, global_batch=batch), devices).values())
        assert recount == candidate.predicted.memory_per_device_bytes
        assert candidate.predicted.step_time_s >= chosen.predicted.step_time_s
    assert chosen.search.feasible >= 1 + len(chosen.alternatives)


def test_memory_model_counts_states_exactly():
    """fp32 AdamW on one device: 4 bytes of parameter, 4 of gradient, 8 of optimizer state per parameter."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    real = {
        "parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()),
        "optimizer": sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim()),
    }
    profile = onegpu.planner.analysis.analyze(model, seq_len=1, sample=torch.randn(1, 64))
    mem = memory(Plan(dp=1), Workload(profile=profile, global_batch=2), cluster(nodes=1, per_node=1, memory_gb=1))
    assert {k: mem[k] for k in real} == real
    sharded = memory(
        Plan(dp=2, sharding="parameters"),
        Workload(profile=profile, global_batch=2),
        cluster(nodes=1, per_node=2, memory_gb=1),
    )
    assert {k: sharded[k] for k in real} == {k: v // 2 for k, v in real.items()}


def test_sequence_parallelism_splits_all_of_a_blocks_activations():
    """Korthikanti et al. 2022: a block holds 34 bytes per token and hidden unit; tensor parallelism alone
    leaves 10 of them (norms, residuals, inputs) whole on every rank, sequence parallelism splits them too."""
    profile = transformer(layers=4, hidden=1024)
    profile = replace(profile, rest=replace(profile.rest, activation_bytes=0))  # the blocks' activations only
    devices = cluster(nodes=1, per_node=8, memory_gb=80)

    def activations(plan: Plan, *, sequence_parallel: bool = True) -> int:
        work = Workload(profile=profile, global_batch=1, sequence_parallel=sequence_parallel)
        return memory(plan, work, devices)["activations"]

    whole = activations(Plan(dp=1))
    assert whole / activations(Plan(dp=1, tp=8)) == pytest.approx(8)
    assert whole / activations(Plan(dp=1, tp=8), sequence_parallel=False) == pytest.approx(34 / (10 + 24 / 8))


def test_a_pipeline_is_costed_as_the_runtime_cuts_it():
    """The runtime cuts blocks by FLOPs with the head on the last stage; the planner's memory is that of the
    fullest worker of that very cut, holding the micro-batches its schedule keeps in flight."""
    profile = transformer(layers=8, hidden=256, seq=256)  # a 32k-vocabulary head as heavy as several blocks
    (cut,) = flops_cuts(profile, stages=2)
    assert cut > 4 and worker_stage_blocks(profile, pp=2, schedule="1f1b") == [(cut,), (8 - cut,)]
    bounds = [0, *flops_cuts(profile, stages=4), 8]
    sizes = [end - start for start, end in zip(bounds, bounds[1:])]
    assert worker_stage_blocks(profile, pp=2, schedule="interleaved") == [(sizes[0], sizes[2]), (sizes[1], sizes[3])]
    devices, work = cluster(nodes=1, per_node=2, memory_gb=80), Workload(profile=profile, global_batch=8)
    one_f_one_b = memory(Plan(dp=1, pp=2, microbatches=4, schedule="1f1b"), work, devices)
    block = profile.blocks[0]
    assert one_f_one_b["parameters"] == (cut * block.params + profile.rest.params) * 4  # fp32 master weights
    gpipe = memory(Plan(dp=1, pp=2, microbatches=4, schedule="gpipe"), work, devices)
    assert gpipe["activations"] > one_f_one_b["activations"]  # GPipe holds all 4 micro-batches, 1F1B 2


def test_pins_are_honoured_by_any_name():
    profile, devices = transformer(layers=16, hidden=4096), cluster(nodes=2, per_node=8, memory_gb=80)
    pinned = find_plan(
        profile,
        global_batch_size=64,
        seq_len=2048,
        cluster=devices,
        num_stages=2,
        num_micro_batches=8,
        schedule="1f1b",
        activation_recomputation="full",
        mixed_precision="bf16",
        distribute_parameter=False,
    )
    assert (pinned.pp, pinned.microbatches, pinned.schedule, pinned.activation_checkpointing, pinned.precision) == (
        2,
        8,
        "1f1b",
        "full",
        "bf16",
    )
    assert pinned.sharding in ("none", "optimizer", "gradients")
    assert (
        find_plan(profile, global_batch_size=64, seq_len=2048, cluster=devices, pipeline_parallel=False, tp=4).pp == 1
    )


@pytest.mark.parametrize(
    ("pins", "message"),
    [
        ({"tp": 3}, "tp=3 must divide the 8 devices of a node"),
        ({"tp": 8, "pp": 4, "dp": 4}, "dp \\* tp \\* pp must equal 16"),
        ({"pp": 64}, "pp=64 is more pipeline stages than"),
        ({"schedule": "zigzag"}, "schedule='zigzag' is not known"),
        ({"sharding": "zero3"}, "sharding='zero3' is not known: use one of none, optimizer"),
        ({"warp_speed": 9}, "unknown pin 'warp_speed'"),
        ({"activation_checkpointing": "most"}, "use none, selective, full, or a number of blocks"),
    ],
)
def test_impossible_pins_say_why(pins, message):
    with pytest.raises(UsageError, match=message):
        find_plan(
            transformer(layers=16, hidden=4096),
            global_batch_size=64,
            seq_len=2048,
            cluster=cluster(nodes=2, per_node=8, memory_gb=80),
            **pins,
        )


def test_a_model_too_big_for_the_cluster_says_what_would_fit():
    with pytest.raises(NoPlanFits) as error:
        find_plan(
            transformer(layers=96, hidden=12288),
            global_batch_size=64,
            seq_len=2048,
            cluster=cluster(nodes=1, per_node=8, memory_gb=40),
            offload="none",
        )
    text = str(error.value)
    assert text.startswith("no plan fits: the smallest needs ")
    assert "devices (" in text and "nodes) would fit" in text


def test_plan_json_shape_is_stable():
    chosen = find_plan("gpt2", global_batch_size=32, seq_len=1024, cluster=load_cluster("a100-80gb", nodes=1))
    data = chosen.to_dict()
    assert list(data) == ["plan", "predicted", "alternatives", "search", "confidence"]
    assert list(data["plan"]) == [
        "dp",
        "tp",
        "pp",
        "microbatches",
        "schedule",
        "sharding",
        "activation_checkpointing",
        "offload",
        "precision",
        "shard_group",
        "compile",
        "blocks",
        "stages",
        "tensor_parallel",
    ]
    assert data["plan"]["blocks"] == "transformer.h"  # fitted to the model: the runtime builds it from this alone
    assert Plan.from_json(chosen.to_json()) == chosen
    kept = Plan.from_json(chosen.to_json())  # with the planner's notes: what a job's plan.json keeps
    assert (kept.predicted, kept.reason, kept.search, kept.confidence) == (
        chosen.predicted, chosen.reason, chosen.search, chosen.confidence
    )  # fmt: skip
    assert [a.predicted for a in kept.alternatives] == [a.predicted for a in chosen.alternatives]
    assert [(r.plan.predicted, r.why) for r in kept.rejected] == [(r.plan.predicted, r.why) for r in chosen.rejected]
    assert list(data["predicted"]) == [
        "step_time_s",
        "tokens_per_s",
        "tflops_per_device",
        "mfu",
        "memory_per_device_bytes",
        "memory_breakdown",
        "time_breakdown",
    ]
    assert list(data["search"]) == ["candidates", "feasible", "seconds"]
    assert all(list(a) == ["plan", "predicted"] for a in data["alternatives"])


def test_a_batch_no_degree_divides_is_an_error():
    with pytest.raises(UsageError, match="global batch size 7 cannot be split evenly"):
        find_plan(
            transformer(layers=8, hidden=1024),
            global_batch_size=7,
            seq_len=2048,
            cluster=cluster(nodes=1, per_node=8, memory_gb=80),
            dp=8,
        )


def test_hybrid_sharding_shards_inside_a_node_and_says_so_in_the_plan():
    """On 2 nodes of 8, a pinned hybrid plan shards over the replicas of one node: 8 / (tp * pp) of them."""
    chosen = find_plan(
        transformer(layers=16, hidden=4096),
        global_batch_size=64,
        seq_len=2048,
        cluster=cluster(nodes=2, per_node=8, memory_gb=80),
        sharding="hybrid",
    )
    for plan in (chosen, *chosen.alternatives):
        assert plan.sharding == "hybrid" and plan.shard_group == 8 // (plan.tp * plan.pp) < plan.dp
    assert Plan.from_json(chosen.to_json()).shard_group == chosen.shard_group


def test_interleaved_schedules_are_not_proposed_with_fsdp_sharding():
    chosen = find_plan(
        transformer(layers=16, hidden=4096),
        global_batch_size=64,
        seq_len=2048,
        cluster=cluster(nodes=2, per_node=8, memory_gb=80),
        pp=2,
        schedule="interleaved",
    )
    assert {p.sharding for p in (chosen, *chosen.alternatives)} <= {"none", "optimizer"}


def test_selective_recomputation_sits_between_none_and_full():
    """Where nothing fits without recomputation, the search weighs selective recomputation (measured: half a
    block's activations kept) against recomputing whole blocks, and takes it when it fits and is faster;
    a profile without the measurement never gets it, and a pin asks for it."""
    unmeasured = transformer(layers=24, hidden=2048)
    block = replace(unmeasured.blocks[0], selective_activation_bytes=unmeasured.blocks[0].activation_bytes // 2)
    measured = replace(unmeasured, blocks=(block,) * 24)
    pins = dict(dp=8, tp=1, pp=1, microbatches=1, sharding="parameters", mixed_precision="bf16")
    devices = cluster(nodes=1, per_node=8, memory_gb=80)
    work = Workload(profile=measured, global_batch=64)
    need = {c: sum(memory(Plan(dp=8, sharding="parameters", precision="bf16", activation_checkpointing=c), work,
                          devices).values()) for c in ("none", "selective")}  # fmt: skip
    assert need["selective"] < need["none"]
    tight = cluster(nodes=1, per_node=8, memory_gb=(need["none"] + need["selective"]) / 2 / 1e9)

    def chosen(profile, **more):
        plan = find_plan(
            profile, global_batch_size=64, seq_len=2048, cluster=tight, budget_fraction=1.0, **pins, **more
        )
        return plan.activation_checkpointing

    assert chosen(measured) == "selective"
    assert chosen(unmeasured) not in ("none", "selective")  # some blocks recompute wholly
    assert chosen(measured, activation_checkpointing="full") == "full"
    assert find_plan(measured, global_batch_size=64, seq_len=2048, cluster=devices, activation_checkpointing="selective",
                     **pins).activation_checkpointing == "selective"  # fmt: skip
