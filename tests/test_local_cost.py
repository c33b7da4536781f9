"""The cost model on CPU workers (this machine): what it measures rather than assumes."""

import pytest
from transformers import LlamaConfig

from onegpu.plan import Plan
from onegpu.planner.analysis import analyze
from onegpu.planner.cluster import load_cluster
from onegpu.planner.cluster_measure import _measured_node
from onegpu.planner.cost_model import Workload, _Step, predict
from onegpu.planner.memory_model import CPU_COMPILE_BYTES, CPU_RUNTIME_BYTES

CPU = _measured_node(name="cpu (1 thread)", devices=2, device_memory_bytes=8e9, flops_per_s={"fp32": 80e9},
                     memory_bytes_per_s=5e9, link_bytes_per_s=0.7e9, latency_s=75e-6)  # fmt: skip
# an odd shape on purpose: 3 layers of width 320, a vocabulary of 1000
PROFILE = analyze(
    LlamaConfig(vocab_size=1000, hidden_size=320, intermediate_size=864, num_hidden_layers=3, num_attention_heads=5),
    seq_len=96,
    precision="fp32",
)


@pytest.mark.parametrize("plan", [Plan(dp=2), Plan(dp=1, pp=2, microbatches=4, schedule="1f1b")])
def test_a_measured_block_sets_the_time_of_every_part_of_a_cpu_step(plan):
    measured = Workload(profile=PROFILE, global_batch=12, measured_block=(0.5, 4))  # 0.5 s for 4 samples
    step = _Step(plan, measured, CPU)
    block = step.part_time(step.block, recompute=False)
    assert block == pytest.approx(0.5 / 4 * step.micro_batch)  # per sample, as measured
    scale = block / step.modelled_time(step.block, recompute=False)
    rest = PROFILE.rest  # the embedding, the head and the loss run the same kernels: scaled alike
    assert step.part_time(rest, recompute=False) == pytest.approx(scale * step.modelled_time(rest, recompute=False))
    unmeasured = Workload(profile=PROFILE, global_batch=12)
    assert (
        predict(plan, measured, CPU).time_breakdown["optimizer"]
        == predict(plan, unmeasured, CPU).time_breakdown["optimizer"]
    )


def test_a_measured_block_does_not_change_a_gpu_prediction():
    h100 = load_cluster("h100-80gb")
    work = Workload(profile=PROFILE, global_batch=16)
    measured = Workload(profile=PROFILE, global_batch=16, measured_block=(1.0, 2))
    assert predict(Plan(dp=8), measured, h100).step_time_s == predict(Plan(dp=8), work, h100).step_time_s


def test_a_cpu_worker_holds_its_runtime_and_what_compiling_added():
    work = Workload(profile=PROFILE, global_batch=12)
    eager = predict(Plan(dp=2), work, CPU).memory_breakdown["runtime"]
    compiled = predict(Plan(dp=2, compile=True), work, CPU).memory_breakdown["runtime"]
    assert (eager, compiled) == (int(CPU_RUNTIME_BYTES), int(CPU_RUNTIME_BYTES + CPU_COMPILE_BYTES))


def test_flat_buckets_are_never_larger_than_the_gradients_they_hold():
    small = Workload(profile=PROFILE, global_batch=12)
    buffers = predict(Plan(dp=2, sharding="gradients"), small, CPU).memory_breakdown["framework_buffers"]
    params = PROFILE.params
    assert buffers <= 2 * 4 * params * 1.25 + 1
