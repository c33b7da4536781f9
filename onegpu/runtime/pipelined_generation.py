"""Calls that carry a KV cache under a pipeline: ``model.generate``'s prefill and decode steps, as on one device.

A schedule cuts a batch into micro-batches and keeps no state between calls; a cache is state. So a call
under ``torch.no_grad()`` that passes a cache (``cache=``/``past_key_values=``) or ``use_cache=True`` runs
the stages one after another on the whole batch: the first stage's worker runs the model's forward up to
its last block and sends the activation to the next stage's worker, and so on; the last stage's output
(the logits) is broadcast to every worker of the pipeline, so every worker's generation loop sees the same
logits, picks the same tokens and stays in step with the others. Under ``torch.no_grad()``, a batch the
schedule cannot cut into the plan's micro-batches (on any replica: they agree) runs that way too, without
a cache unless asked for (under data parallelism, only when the model computes no loss: it would be the
replica's rows' only).

Each worker keeps its own cache object, the one its loop passes in and gets back. Only the blocks it holds
write their layers of it: memory stays split like the weights. The model reads the cache's lengths where
it builds masks and positions (layer 0's, before any block runs), and that layer may be another worker's:

- every layer this worker does not hold is advanced after each call by a placeholder of one value per
  token and row (``(rows, 1, tokens, 1)``), so it reports the sequence length a real layer would;
- each stage sees a view of the cache whose layers outside its range are as they were when the call
  began, so a worker holding two stages (interleaved schedules) builds the second's masks as the first's.

When a generation starts (an empty cache), every worker takes the first one's random state: sampling then
picks the same tokens on every worker.

With data parallelism every replica runs a call that carries a cache on the whole batch (the prompts are
not split across replicas: each replica's loop holds every row's cache).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from onegpu.batches import CACHE_NAMES
from onegpu.outputs import find_loss
from onegpu.parallel.pipeline import BlockRangeStage
from onegpu.runtime.call_slicing import random_state, set_random_state
from onegpu.runtime.pipeline_outputs import broadcast_output

OWN_CACHE = "onegpu: this worker's own cache"  # what crosses the pipeline in the cache's place
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HEADER = 8  # an activation's dtype, rank and shape, sent before it


class StagesInSequence:
    """This worker's block stages, run one after another on a whole batch (calls that carry a KV cache)."""

    def __init__(self, *, stages: dict[int, BlockRangeStage], num_stages: int, blocks: int, group, device, watchdog,
                 config: Any, microbatches: int, replicas) -> None:  # fmt: skip
        self.stages, self.num_stages, self.group, self.device = stages, num_stages, group, device
        self.watchdog, self.microbatches, self.replicas = watchdog, microbatches, replicas  # replicas: their group
        self.workers, self.me = dist.get_world_size(group), dist.get_rank(group)
        self.layers = blocks
        self.held = sorted(i for stage in stages.values() for i in stage.layers)  # none: a traced graph's stages
        self.config = config
        forward = next(iter(stages.values())).model.forward if stages else None
        self.takes_use_cache = forward is not None and "use_cache" in inspect.signature(forward).parameters

    @classmethod
    def of(cls, pipeline: Any) -> StagesInSequence:
        """A :class:`onegpu.runtime.pipelined.Pipeline`'s stages (a traced graph's run no call in sequence)."""
        stages = {} if pipeline.plan.stages.traced else pipeline.stages
        config = getattr(pipeline.model, "config", None)
        return cls(stages=stages, num_stages=pipeline.plan.pipeline_stages, blocks=getattr(pipeline, "blocks", 0),
                   group=pipeline.pipe_group, device=pipeline.device, watchdog=pipeline.watchdog, config=config,
                   microbatches=pipeline.plan.microbatches, replicas=pipeline.data_group)  # fmt: skip

    def carries_cache(self, inputs: dict[str, Any]) -> bool:
        """Whether a call runs in sequence for its cache: under ``torch.no_grad()``, given one or asking for one."""
        if not self.stages or torch.is_grad_enabled():
            return False
        return inputs.get("use_cache") is True or any(inputs.get(name) is not None for name in CACHE_NAMES)

    def uncut(self, inputs: dict[str, Any], *, loss: Any) -> Any | None:
        """Under ``torch.no_grad()``, the output for a batch (of ``loss.samples``) that the schedule cannot cut into
        its micro-batches, here or on another replica (they agree), run whole. None: the schedule runs it, or the
        whole batch cannot stand for it (a target; under data parallelism, a loss of this replica's rows only)."""
        if not self.stages or torch.is_grad_enabled() or loss.target is not None:
            return None
        uneven = torch.tensor([float(loss.samples % self.microbatches != 0)], device=self.device)
        if self.replicas is not None:
            dist.all_reduce(uneven, op=dist.ReduceOp.MAX, group=self.replicas)
        if not uneven.item():
            return None
        output = self.run(inputs)
        return None if self.replicas is not None and find_loss(output) is not None else output

    def run(self, inputs: dict[str, Any]) -> Any:
        """The model's output for ``inputs`` on every worker of the pipeline, its cache this worker's."""
        if self.watchdog is None:
            return self._run(inputs)
        self.watchdog.enter("pipeline stages in sequence")
        try:
            return self._run(inputs)
        finally:
            self.watchdog.leave()

    def _run(self, inputs: dict[str, Any]) -> Any:
        inputs, name, cache = self._with_cache(dict(inputs))
        layers = self._cache_layers(cache) if cache is not None else None
        before = [_frozen(layer) for layer in layers] if layers is not None else None
        if before is not None and int(before[self.held[0]].get_seq_length()) == 0:
            self._share_random_state()  # a generation starts
        output, views, received = None, [], None
        for index in range(self.num_stages):
            if index % self.workers != self.me:
                continue
            stage = self.stages[index]
            if cache is not None:
                views.append(_view(cache, before, keep=stage.layers))
                inputs[name] = views[-1]
            if index > 0:
                received = self._receive(source=(index - 1) % self.workers)
            result = self._run_stage(stage, received, inputs)
            if index < self.num_stages - 1:
                self._send(result, destination=(index + 1) % self.workers)
            else:
                output = _replace(result, lambda leaf: any(leaf is v for v in (cache, *views)), OWN_CACHE)
        if cache is not None:
            self._advance_others(layers, before)
        last = dist.get_global_rank(self.group, (self.num_stages - 1) % self.workers)
        output = broadcast_output(output, src=last, group=self.group, device=self.device)
        return _replace(output, lambda leaf: isinstance(leaf, str) and leaf == OWN_CACHE, cache)

    def _with_cache(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], str, Any]:
        """The inputs, the name of the model's cache input, and the cache: the given one, a new one when the
        call asks for a cache without giving one, or none."""
        name = next((n for n in CACHE_NAMES if inputs.get(n) is not None), None)
        if name is not None:
            return inputs, name, inputs[name]
        if inputs.get("use_cache") is not True:  # as the schedule runs it: no stage makes a cache
            return ({**inputs, "use_cache": False} if self.takes_use_cache else inputs), "", None
        from transformers import DynamicCache  # a model taking use_cache is a Hugging Face one

        name = next((n for n in CACHE_NAMES if n in inputs), CACHE_NAMES[0])
        cache = DynamicCache(config=self.config)
        return {**inputs, name: cache}, name, cache

    def _cache_layers(self, cache: Any) -> list[Any]:
        """The cache's self-attention layers, one per block (a cache that makes its layers when first written
        to makes them now, so that every stage's view holds them all)."""
        inner = _attention_cache(cache)
        make = getattr(inner, "layer_class_to_replicate", None)
        while make is not None and len(inner.layers) < self.layers:
            inner.layers.append(make())
        return inner.layers

    def _share_random_state(self) -> None:
        """Every worker of the pipeline takes its first worker's random state: each worker's loop samples from
        the same logits, so sampling (``do_sample=True``) picks the same tokens on each."""
        state = [random_state(self.device) if self.me == 0 else None]
        first = dist.get_global_rank(self.group, 0)
        dist.broadcast_object_list(state, src=first, group=self.group, device=self.device)
        set_random_state(state[0], self.device)

    def _run_stage(self, stage: BlockRangeStage, received: torch.Tensor | None, inputs: dict[str, Any]) -> Any:
        stage.with_cache = True  # the call goes through the stage module itself, so its wrappers' hooks run
        try:
            return stage(received, **inputs) if received is not None else stage(**inputs)
        finally:
            stage.with_cache = False

    def _advance_others(self, layers: list[Any], before: list[Any]) -> None:
        """Grow the layers of other workers' blocks by as many tokens as this call's held layer grew."""
        mine = layers[self.held[0]]
        grown = int(mine.get_seq_length()) - int(before[self.held[0]].get_seq_length())
        if grown <= 0:
            return
        placeholder = torch.ones(mine.keys.shape[0], 1, grown, 1, dtype=mine.keys.dtype, device=mine.keys.device)
        for index in range(self.layers):
            if index not in self.held and hasattr(layers[index], "get_seq_length"):
                layers[index].update(placeholder, placeholder)

    def _send(self, activation: torch.Tensor, *, destination: int) -> None:
        header = torch.zeros(HEADER, dtype=torch.int64, device=self.device)
        header[0], header[1] = DTYPES.index(activation.dtype), activation.dim()
        header[2 : 2 + activation.dim()] = torch.tensor(activation.shape)
        peer = dist.get_global_rank(self.group, destination)
        dist.send(header, dst=peer, group=self.group)
        dist.send(activation.detach().contiguous(), dst=peer, group=self.group)

    def _receive(self, *, source: int) -> torch.Tensor:
        header = torch.zeros(HEADER, dtype=torch.int64, device=self.device)
        peer = dist.get_global_rank(self.group, source)
        dist.recv(header, src=peer, group=self.group)
        dtype, rank = DTYPES[int(header[0])], int(header[1])
        activation = torch.empty(header[2 : 2 + rank].tolist(), dtype=dtype, device=self.device)
        dist.recv(activation, src=peer, group=self.group)
        return activation


def _attention_cache(cache: Any) -> Any:
    """The self-attention part of a cache (an encoder-decoder cache keeps it apart)."""
    return getattr(cache, "self_attention_cache", cache)


def _frozen(layer: Any) -> Any:
    """A cache layer as it is now, for reading its length: a shallow copy (its keys and values are shared, and
    a layer replaces them as it grows), with its own copy of a length counted in place (a static layer's)."""
    frozen = copy.copy(layer)
    for name, value in vars(frozen).items():
        if torch.is_tensor(value) and value.dim() == 0:
            setattr(frozen, name, value.clone())
    return frozen


def _view(cache: Any, before: list[Any], *, keep: range) -> Any:
    """``cache`` whose layers outside ``keep`` are as they were in ``before``; its layers in ``keep`` are the
    cache's own (updated in place)."""
    inner = _attention_cache(cache)
    view = copy.copy(inner)
    view.layers = [layer if index in keep else before[index] for index, layer in enumerate(inner.layers)]
    if inner is cache:
        return view
    outer = copy.copy(cache)
    outer.self_attention_cache = view
    return outer


def _replace(output: Any, chosen: Callable[[Any], bool], value: Any) -> Any:
    """``output`` (a ModelOutput, a tuple, ...) with its ``chosen`` values replaced by ``value``."""
    return tree_map(lambda leaf: value if chosen(leaf) else leaf, output)
