"""What ``torch.compile`` gains on one of the model's blocks, measured on the job's own device, and cached.

One block's forward and backward is timed eager and compiled (:func:`onegpu.parallel.compile.apply_compile`,
what a compiled plan runs), on the inputs it receives from the model's call on one worker's slice of a
batch. The ratio compiled / eager is what the cost model multiplies a compiled block's time by. It is
cached in ``$ONEGPU_HOME/cache`` (else the user cache directory), keyed by the device, the torch
version, the threads and the block's signature (its class, parameters and inputs), so a job pays the
compile and the timing once.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from onegpu.batches import as_call
from onegpu.parallel.blocks import blocks_at
from onegpu.parallel.compile import apply_compile
from onegpu.planner.cluster_measure import _seconds, cache_root, write_json


class _Captured(Exception):  # noqa: N818 - not an error: how the model's call is stopped at its first block
    def __init__(self, args: tuple, kwargs: dict[str, Any]) -> None:
        self.args, self.kwargs = args, kwargs


def compiled_block_time(
    model: nn.Module, batch: Any, *, blocks: str, device: torch.device, cache: bool = True
) -> float | None:
    """A compiled block's forward and backward time over the eager one's on ``device`` (below 1: compile is
    faster), for ``model``'s first block under ``batch`` (one worker's slice). None when it cannot be measured:
    a model on the meta device, or a block that does not compile here."""
    return block_times(model, batch, blocks=blocks, device=device, cache=cache)[0]


def block_times(
    model: nn.Module, batch: Any, *, blocks: str, device: torch.device, cache: bool = True
) -> tuple[float | None, float | None]:
    """The compiled block's time over the eager one's (as ``compiled_block_time``), and the eager block's forward
    and backward in seconds on ``batch`` (the fastest of several); None where not measured."""
    first = blocks_at(model, blocks)[0]
    if any(p.is_meta for p in model.parameters()):
        return None, None
    args, kwargs = _block_inputs(model, first, batch)
    path = cache_root() / f"compile-{_signature(first, args, kwargs, device)}.json"
    if cache:
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
            return kept["compiled_block_time"], kept.get("eager_s")
        except (OSError, ValueError, KeyError, TypeError):
            pass
    args, kwargs = _to(args, device), _to(kwargs, device)
    eager, compiled = copy.deepcopy(first).to(device), copy.deepcopy(first).to(device)
    apply_compile([compiled])
    eager_step, compiled_step = _step(eager, args, kwargs), _step(compiled, args, kwargs)
    try:
        eager_s, compiled_s = _fastest(eager_step, compiled_step, device=device)
        ratio = compiled_s / eager_s
    except Exception as error:  # noqa: BLE001 - no compiler, an unsupported op: the plan stays eager
        print(f"onegpu: torch.compile does not run here ({type(error).__name__}); blocks stay eager", file=sys.stderr)
        eager_s, ratio = None, None
    write_json(path, {"compiled_block_time": ratio, "eager_s": eager_s})
    return ratio, eager_s


def _block_inputs(model: nn.Module, block: nn.Module, batch: Any) -> tuple[tuple, dict[str, Any]]:
    """What ``block`` receives when ``model`` is called on ``batch`` (without a KV cache), detached."""

    def stop(_module, args, kwargs):
        raise _Captured(args, kwargs)

    args, kwargs = as_call(batch)
    where = next(model.parameters()).device
    args, kwargs = _to(args, where), _to(kwargs, where)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False  # a cache is for generation: training blocks do not get one
    hook = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*args, **kwargs)
    except _Captured as captured:
        return _detached(captured.args), _detached(captured.kwargs)
    finally:
        hook.remove()
    raise RuntimeError("the model's call did not reach its first block")


def _step(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Callable[[], None]:
    """One forward and backward of ``block`` on copies of the inputs (the first one needing its gradient)."""
    args = tuple(a.detach().clone().requires_grad_(i == 0 and a.is_floating_point()) if torch.is_tensor(a) else a
                 for i, a in enumerate(args))  # fmt: skip

    def step() -> None:
        for p in block.parameters():
            p.grad = None
        output = block(*args, **kwargs)
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        sum(t.float().sum() for t in outputs if torch.is_tensor(t) and t.requires_grad).backward()

    return step


def _fastest(*steps: Callable[[], None], device, budget_s: float = 2.0, rounds: int = 30) -> list[float]:
    """Each step's fastest time, after two calls that warm up (and compile); the steps alternate, so that a
    machine busy with other work slows them alike, until ``rounds`` or ``budget_s`` is spent."""
    for step in steps:
        step()
        step()
    best = [math.inf] * len(steps)
    started = time.perf_counter()
    for _ in range(rounds):
        best = [min(b, _seconds(step, device)) for b, step in zip(best, steps)]
        if time.perf_counter() - started > budget_s:
            break
    return best


def _signature(block: nn.Module, args: tuple, kwargs: dict[str, Any], device: torch.device) -> str:
    """A hash of what the measurement depends on: device, torch, threads, the block's class, parameters, inputs."""
    name = device.type
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    described = {
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "block": f"{type(block).__module__}.{type(block).__qualname__}",
        "parameters": [(n, list(p.shape), str(p.dtype)) for n, p in block.named_parameters()],
        "inputs": _shapes((args, sorted(kwargs.items()))),
    }
    return hashlib.sha1(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _shapes(value: Any) -> Any:
    if torch.is_tensor(value):
        return [list(value.shape), str(value.dtype)]
    if isinstance(value, (tuple, list)):
        return [_shapes(v) for v in value]
    return repr(value) if isinstance(value, (int, float, bool, str, type(None))) else type(value).__name__


def _detached(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _to(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
