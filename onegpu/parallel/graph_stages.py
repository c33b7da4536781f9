"""Pipeline stages cut from a model's traced graph, for models without repeated blocks.

``torch.fx`` traces the model (plain PyTorch models trace; Hugging Face models, with their data-
dependent checks, usually do not, and are cut at their repeated blocks instead). The graph's
nodes, in order, are cut into contiguous ranges (where the planner's :mod:`graph_cuts` says). Every value a later stage needs (a skip connection's source, an
intermediate used twice) crosses each cut explicitly; the model's inputs reach every stage.
When tracing fails, the error names the module where it broke.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from onegpu.errors import UsageError
from onegpu.parallel.pipeline import contiguous_gradients, last_stage_output


class _PathTracer(fx.Tracer):
    """A tracer that remembers the module it is in, to name it when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.broke_in: str | None = None  # the innermost module whose forward raised

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.broke_in is None:
                self.broke_in = self.path_of_module(m)
            raise


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as an fx graph over the same parameters; a clear error naming the module that broke tracing."""
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: say where
        where = tracer.broke_in or "its forward"
        raise UsageError(
            f"{type(model).__name__} cannot be cut into pipeline stages: it keeps no repeated blocks in an "
            f"nn.ModuleList or nn.Sequential, and tracing it broke in {where} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); keep its layers in a ModuleList, or use pp=1"
        ) from None
    return fx.GraphModule(model, graph)


class GraphRunner(nn.Module):
    """Runs a traced graph through an interpreter of one's choice (to measure or cut it)."""

    def __init__(self, graph: fx.GraphModule, interpreter: type[fx.Interpreter]) -> None:
        super().__init__()
        self.graph_module, self.interpreter = graph, interpreter

    def forward(self, **inputs):
        names = [n.target for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        return self.interpreter(self.graph_module).run(*[inputs.get(name) for name in names])


def computing_nodes(graph: fx.GraphModule) -> list[fx.Node]:
    """The graph's nodes that compute (not its inputs and output), in order: the units a cut counts."""
    return [n for n in graph.graph.nodes if n.op not in ("placeholder", "output")]


class GraphStage(nn.Module):
    """Nodes ``[start, end)`` of a traced model's graph (counting computing nodes only).

    Takes the values live across its first cut (positionally) and the model's inputs (by name);
    returns the values live across its last cut, or, on the last stage, the loss.
    """

    def __init__(self, graph: fx.GraphModule, *, start: int, end: int, keep_output: bool = False) -> None:
        super().__init__()
        self.model = graph
        nodes = computing_nodes(graph)
        self.first, self.last = start == 0, end == len(nodes)
        self.blocks: list[nn.Module] = []  # no repeated blocks: nothing to checkpoint or shard block by block
        self.nodes = nodes[start:end]
        self.receives = live_across(graph, nodes, start)
        self.sends = live_across(graph, nodes, end)
        self.placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
        self.output = next(n for n in graph.graph.nodes if n.op == "output")
        self.loss_place = (None, 0)  # see BlockRangeStage
        self.keep_output = keep_output  # see BlockRangeStage
        self.outputs: list[Any] | None = None  # see BlockRangeStage

    def connect(self) -> None:
        """Nothing to join: the cuts are explicit."""

    def close(self) -> None:
        """Nothing to undo."""

    def forward(self, *received: torch.Tensor, **inputs: Any):
        contiguous_gradients(received)
        env: dict[fx.Node, Any] = {n: inputs.get(n.target) for n in self.placeholders}
        env.update(zip(self.receives, received))
        runner = fx.Interpreter(self.model)
        runner.env = env
        for node in self.nodes:
            env[node] = runner.run_node(node)
        if not self.last:
            values = tuple(env[n] for n in self.sends)
            return values[0] if len(values) == 1 else values
        return last_stage_output(self, fx.node.map_arg(self.output.args[0], lambda n: env[n]))

    def used_parameters(self) -> set[str]:
        """Names of the parameters this stage's nodes read."""
        used = set()
        for node in self.nodes:
            if node.op == "get_attr":
                used.add(node.target)
            elif node.op == "call_module":
                used |= {
                    f"{node.target}.{name}" for name, _ in self.model.get_submodule(node.target).named_parameters()
                }
        names = {name for name, _ in self.model.named_parameters()}
        return used & names


def live_across(graph: fx.GraphModule, nodes: list[fx.Node], cut: int) -> list[fx.Node]:
    """Computed values made before ``cut`` and used at or after it (model inputs reach every stage anyway)."""
    before = set(nodes[:cut])
    after = set(nodes[cut:]) | {n for n in graph.graph.nodes if n.op == "output"}
    return [n for n in nodes[:cut] if n in before and any(user in after for user in n.users)]
