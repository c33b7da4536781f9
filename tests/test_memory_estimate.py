"""The one memory estimate (memory_model.memory): states counted exactly, activations from the model's inspection
(or said to be uncounted), the simple rule's DDP/FSDP decision, selective recomputation between none and full."""

from dataclasses import replace

import pytest
import torch
from scenarios import build
from torch.utils.data import default_collate

from onegpu.errors import UsageError
from onegpu.plan import Plan
from onegpu.planner.cost_model import Workload, memory, step_time
from onegpu.planner.inspection import describe
from onegpu.planner.profile import ModelProfile, optimizer_state_slots
from onegpu.planner.simple_rule import choose_plan


def parameters_only(model, optimizer, *, batch=2):
    return Workload(profile=ModelProfile.of_parameters(model), global_batch=batch,
                    optimizer_slots=optimizer_state_slots(optimizer))  # fmt: skip


def described(scenario: str, *, batch: int = 4):
    model, data = build(scenario)
    sample = default_collate([data[0]])
    seq = sample["input_ids"].shape[-1] if isinstance(sample, dict) else 1
    profile = describe(model, sample=sample, seq_len=seq).profile
    return model, Workload(profile=profile, global_batch=batch)


def test_states_are_exact_for_adamw():
    model = torch.nn.Linear(10, 5)  # 55 parameters
    need = memory(Plan(dp=1), parameters_only(model, torch.optim.AdamW(model.parameters())), cpu=True)
    assert (need["parameters"], need["gradients"], need["optimizer"]) == (220, 220, 440)
    assert "activations" not in need  # not inspected: not counted, rather than counted as none


def test_states_are_exact_for_blocks_of_different_sizes():
    """A stage of every block holds exactly their parameters, whatever each block's size."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Linear(64, 8), torch.nn.Linear(8, 8))
    profile = describe(model, sample=torch.randn(1, 8), seq_len=1, blocks=list(model)).profile
    need = memory(Plan(dp=2, sharding="none"), Workload(profile=profile, global_batch=2), cpu=True)
    assert need["parameters"] == 4 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("make", "slots"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 1),
        (lambda p: torch.optim.Adam(p, amsgrad=True), 3),
        (lambda p: torch.optim.RMSprop(p, momentum=0.9, centered=True), 3),
    ],
)
def test_optimizer_state_slots(make, slots):
    assert optimizer_state_slots(make(torch.nn.Linear(2, 2).parameters())) == slots


def test_activations_are_what_autograd_saves_and_nothing_is_allocated():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    profile = describe(model, sample=default_collate([torch.randn(64)]), seq_len=1).profile  # one sample
    # saved for backward: the input (32x64, by the first linear) and ReLU's output (32x256, by
    # ReLU and the second linear: one tensor, counted once); fp32. Weights are states, not counted.
    assert profile.activation_bytes_per_sample * 32 == 4 * (32 * 64 + 32 * 256)
    assert (torch.cuda.memory_allocated() if torch.cuda.is_available() else 0) == before


def test_rule_replicates_when_it_fits_and_shards_when_not():
    model = torch.nn.Linear(1000, 1000)
    work = parameters_only(model, torch.optim.AdamW(model.parameters()))
    replicated = sum(memory(Plan(dp=2), work, cpu=True).values())
    assert choose_plan(work=work, budget_bytes=replicated, world_size=2, cpu=True).strategy == "ddp"
    plan = choose_plan(work=work, budget_bytes=replicated - 1, world_size=2, cpu=True, unmeasured="no DataLoader")
    assert plan.strategy == "fsdp" and "exceeds" in plan.reason
    assert "parameters 3.8 MiB + gradients 3.8 MiB + optimizer 7.6 MiB" in plan.reason  # what was counted
    assert "activations not counted: no DataLoader" in plan.reason


def test_rule_counts_the_inspected_activations_of_its_slice():
    _, work = described("hf", batch=4)
    plan = choose_plan(work=work, budget_bytes=2**40, world_size=2, cpu=True)
    need = memory(Plan(dp=2), work, cpu=True)
    assert plan.strategy == "ddp" and f"activations {need['activations'] / 2**20:.1f} MiB" in plan.reason
    doubled = memory(Plan(dp=2), Workload(profile=work.profile, global_batch=8), cpu=True)
    assert doubled["activations"] > need["activations"] and doubled["parameters"] == need["parameters"]


def test_rule_forced_strategies_and_unknown_ones():
    model = torch.nn.Linear(4, 4)
    work = parameters_only(model, None)
    assert choose_plan(work=work, budget_bytes=1, world_size=2, cpu=True, strategy="ddp").strategy == "ddp"
    assert choose_plan(work=work, budget_bytes=2**40, world_size=2, cpu=True, strategy="fsdp").strategy == "fsdp"
    with pytest.raises(UsageError, match="use 'ddp', 'fsdp'"):
        choose_plan(work=work, budget_bytes=1, world_size=2, cpu=True, strategy="zero3")


@pytest.mark.parametrize("scenario", ["hf", "custom"])
def test_selective_recomputation_keeps_what_it_measured(scenario):
    """Selective recomputation keeps each block's measured input and matmul/attention outputs: less than
    without checkpointing, more than full recomputation."""
    _, work = described(scenario, batch=4)
    block = work.profile.blocks[0]
    assert block.boundary_bytes < block.selective_activation_bytes < block.activation_bytes
    acts = {ckpt: memory(Plan(dp=1, activation_checkpointing=ckpt), work, cpu=True)["activations"]
            for ckpt in ("none", "selective", "full")}  # fmt: skip
    assert acts["full"] < acts["selective"] < acts["none"]
    n = len(work.profile.blocks)
    saved = (acts["none"] - acts["selective"]) / 1.25 / work.global_batch  # CPU fragmentation
    held, peak = n * (block.activation_bytes - block.selective_activation_bytes), block.activation_bytes
    assert saved == pytest.approx(held - (peak - block.selective_activation_bytes), rel=1e-3)
    assert step_time(Plan(dp=1, activation_checkpointing="selective"), work, _cpu())["recompute"] > 0


def test_selective_recomputation_costs_a_few_percent_where_gemms_dominate():
    """On a GPU, a 4096-wide block recomputes no GEMM under selective recomputation: a few percent of the
    step (Korthikanti et al. 2022), far less than recomputing whole blocks (a third of the forward and
    backward)."""
    from test_planner_search import cluster, transformer

    profile = transformer(layers=32, hidden=4096, seq=4096)
    block = replace(profile.blocks[0], selective_activation_bytes=profile.blocks[0].activation_bytes // 2, ops=240)
    work = Workload(profile=replace(profile, blocks=(block,) * 32), global_batch=8)
    times = {c: step_time(Plan(dp=8, sharding="parameters", precision="bf16", activation_checkpointing=c), work,
                          cluster(nodes=1, per_node=8, memory_gb=80)) for c in ("selective", "full")}  # fmt: skip
    share = times["selective"]["recompute"] / sum(times["selective"].values())
    assert 0.005 < share < 0.05 and times["selective"]["recompute"] < times["full"]["recompute"] / 5


def test_selective_is_a_plan_value_that_round_trips():
    plan = Plan(dp=2, sharding="parameters", activation_checkpointing="selective")
    assert Plan.from_json(plan.to_json()) == plan and plan.selective and plan.checkpointed_blocks(4) == 0
    assert "checkpointing=selective" in plan.describe()
    with pytest.raises(UsageError, match="'none', 'full', 'selective' or a number of blocks"):
        Plan(dp=1, activation_checkpointing="some")


def test_profiles_without_the_selective_measurement_still_load():
    block = ModelProfile.of_parameters(torch.nn.Linear(2, 2)).rest
    assert block.selective_activation_bytes is None


def _cpu():
    from onegpu.planner.cluster import Cluster, DeviceSpec, Link

    device = DeviceSpec(name="cpu (2 threads)", memory_gb=8, peak_tflops={"fp32": 0.1}, memory_bandwidth_gbps=10)
    link = Link(bandwidth_gbps=1, latency_us=50)
    return Cluster(device=device, nodes=1, devices_per_node=2, intra_node=link, inter_node=link)
