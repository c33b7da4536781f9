"""Where to cut a model without repeated blocks: between the nodes of its traced graph, balanced by each
node's FLOPs (measured on fake tensors), at places where only tensors cross."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from onegpu.errors import UsageError
from onegpu.parallel.graph_stages import GraphRunner, computing_nodes, live_across
from onegpu.planner.stages import balanced_cuts


def measure_nodes(graph: fx.GraphModule, sample: dict[str, Any]) -> tuple[list[float], dict[fx.Node, bool]]:
    """Each computing node's forward+backward FLOPs (three times the forward's), and whether it makes a
    tensor, from one run on fake tensors."""
    costs: list[float] = []
    tensors: dict[fx.Node, bool] = {}
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        state = {
            f"graph_module.{n}": torch.empty(t.shape, dtype=t.dtype)
            for n, t in (*graph.named_parameters(), *graph.named_buffers())
        }
        inputs = tree_map(lambda t: fake.from_tensor(t) if torch.is_tensor(t) else t, sample)

        class Measure(fx.Interpreter):
            def run_node(self, node):
                if node.op in ("placeholder", "output"):
                    return super().run_node(node)
                with FlopCounterMode(display=False) as counter:
                    result = super().run_node(node)
                costs.append(3.0 * counter.get_total_flops() + 1.0)  # +1: every node costs something
                tensors[node] = torch.is_tensor(result)
                return result

        with torch.no_grad():
            functional_call(GraphRunner(graph, Measure), state, args=(), kwargs=inputs)
    return costs, tensors


def graph_cuts(graph: fx.GraphModule, sample: dict[str, Any], *, stages: int) -> list[int]:
    """The first node of stages 1..S-1, balanced by node FLOPs among the places a cut may go."""
    costs, tensors = measure_nodes(graph, sample)
    nodes = computing_nodes(graph)
    # stages send tensors only: a cut may go where every value crossing it is one
    edges = [0, *(c for c in range(1, len(nodes)) if all(tensors[n] for n in live_across(graph, nodes, c))), len(nodes)]
    if len(edges) - 1 < stages:
        raise UsageError(
            f"the traced graph has only {len(edges) - 2} places where tensors alone cross a cut: "
            f"use at most {len(edges) - 1} pipeline stages"
        )
    segments = [sum(costs[a:b]) for a, b in zip(edges, edges[1:])]
    return [edges[cut] for cut in balanced_cuts(segments, stages=stages)]
