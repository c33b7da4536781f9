"""A plan says which of the figures its prediction rests on nobody measured."""

import json

from onegpu.plan import Plan
from onegpu.planner.cluster import Cluster, DeviceSpec, Link, load_cluster
from onegpu.planner.search import find_plan
from tests.test_planner_search import transformer


def measured_local(*, nodes: int) -> Cluster:
    """A ``local`` cluster as measured on one node of two CPU workers (the link across nodes is the one inside)."""
    link = Link(bandwidth_gbps=2.0, latency_us=40.0)
    device = DeviceSpec(name="cpu (1 thread)", memory_gb=8.0, peak_tflops={"fp32": 0.05}, memory_bandwidth_gbps=10)
    return Cluster(device=device, nodes=nodes, devices_per_node=2, intra_node=link, inter_node=link, name="local")


def test_a_preset_across_nodes_rests_on_preset_peaks_and_links():
    chosen = find_plan("gpt2", global_batch_size=64, seq_len=1024, cluster=load_cluster("a100-80gb", nodes=2))
    notes = chosen.confidence
    peak = {"bf16": 312, "fp32": 19.5}[chosen.precision]
    assert notes[0] == (
        f"A100 SXM4 80GB: peak {peak:g} TFLOP/s ({chosen.precision}) and 2039 GB/s of memory bandwidth are "
        "the preset's figures (datasheet or estimate), not measured"
    )
    assert (
        notes[1]
        == "the link across nodes (25 GB/s per device) is the preset's figure (datasheet or estimate), not measured"
    )
    assert json.loads(json.dumps(chosen.to_dict()))["confidence"] == list(notes)
    assert Plan.from_json(chosen.to_json()) == chosen  # notes are not part of what the runtime reads


def test_a_measured_node_has_nothing_to_say_until_the_plan_spans_nodes():
    profile = transformer(layers=4, hidden=64, seq=32, vocab=256, heads=4)
    one = find_plan(profile, global_batch_size=8, seq_len=32, cluster=measured_local(nodes=1))
    assert one.confidence == ("t4x64's profile was given, not inspected: its costs are taken as they are",)
    two = find_plan("gpt2", global_batch_size=8, seq_len=32, cluster=measured_local(nodes=2))
    assert two.confidence == (
        "the plan spans 2 nodes but only the link inside one node was measured: the link across nodes is assumed "
        "as fast (2 GB/s per device)",
    )


def test_a_cluster_file_is_taken_as_written(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "device: {name: g, memory_gb: 80, peak_tflops: {bf16: 312, fp32: 19.5}, memory_bandwidth_gbps: 2039}\n"
        "nodes: 1\ndevices_per_node: 8\n"
        "intra_node: {bandwidth_gbps: 300, latency_us: 3}\ninter_node: {bandwidth_gbps: 25, latency_us: 5}\n"
    )
    chosen = find_plan("gpt2", global_batch_size=32, seq_len=512, cluster=load_cluster(str(path)))
    assert chosen.confidence == (
        "the device and link figures are those written in the cluster file 'mine', not measured",
    )
