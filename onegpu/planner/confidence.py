"""Where a prediction rests on figures nobody measured: the notes ``onegpu plan`` shows beside it."""

from __future__ import annotations

from onegpu.plan import Plan
from onegpu.planner.cluster_presets import PRESETS
from onegpu.planner.hardware import Cluster
from onegpu.planner.inspection import ModelDescription


def confidence_notes(plan: Plan, *, cluster: Cluster, description: ModelDescription) -> tuple[str, ...]:
    """One short note per unmeasured assumption ``plan``'s prediction rests on: a preset's figures (datasheet or estimate),
    a link the plan crosses that was never measured, a model whose profile was given rather than inspected."""
    notes = []
    device, spans_nodes = cluster.device, plan.world_size > cluster.devices_per_node
    preset = PRESETS.get(cluster.name)
    precision = plan.precision if plan.precision in device.peak_tflops else "fp32"
    if preset is not None and preset.device == cluster.device:
        notes.append(
            f"{device.name}: peak {device.peak_tflops[precision]:g} TFLOP/s ({precision}) and "
            f"{device.memory_bandwidth_gbps:g} GB/s of memory bandwidth are the preset's figures (datasheet or estimate), not measured"
        )
        link = "across nodes" if spans_nodes else "inside a node"
        bandwidth = (cluster.inter_node if spans_nodes else cluster.intra_node).bandwidth_gbps
        if plan.world_size > 1:
            notes.append(
                f"the link {link} ({bandwidth:g} GB/s per device) is the preset's figure (datasheet or estimate), not measured"
            )
    elif cluster.name == "local":
        if spans_nodes and cluster.inter_node == cluster.intra_node:
            notes.append(
                f"the plan spans {cluster.nodes} nodes but only the link inside one node was measured: the link "
                f"across nodes is assumed as fast ({cluster.inter_node.bandwidth_gbps:g} GB/s per device)"
            )
    else:
        notes.append(
            f"the device and link figures are those written in the cluster file {cluster.name!r}, not measured"
        )
    if not description.inspected:
        notes.append(f"{description.name}'s profile was given, not inspected: its costs are taken as they are")
    return tuple(notes)
