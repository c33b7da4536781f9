"""One inspection of a model: everything the planner needs to know about it, from one forward and backward
pass on the meta device (nothing is allocated).

The pass records, at once:
- per repeated block, its parameters, forward and backward FLOPs, the bytes autograd keeps for backward
  (and those selective recomputation keeps: its input and its matmul and attention outputs) and its operator count (:class:`ModelProfile`, the cost model's input);
- the tensor-parallel structure of the blocks (:mod:`tensor_parallel_discovery`);
- which block, or the end of the model, uses each parameter (:mod:`parameter_usage`): what each pipeline
  stage must hold.

The planner turns that into the layout fields of a Plan (cuts, tensor-parallel groups, each stage's
parameters); the runtime reads the Plan and never inspects the model itself.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from onegpu.batches import as_call, tensors_in, to_meta
from onegpu.errors import UsageError
from onegpu.parallel.batch_norm import batch_norm_layers
from onegpu.parallel.blocks import block_container, repeated_blocks
from onegpu.parallel.checkpointing import KEPT_OPERATORS
from onegpu.plan import StageLayout, TensorParallelLayout
from onegpu.planner.meta_kernels import FLOP_FORMULAS, GroupedMatmulsInBF16, has_attention_choice, meta_attention
from onegpu.planner.parameter_usage import END, START, ParameterUsage
from onegpu.planner.profile import DTYPES, ModelProfile, PartProfile, attention_flops_of, loss_of, per_block
from onegpu.planner.tensor_parallel_discovery import TensorParallelFindings, TensorParallelRecorder


@dataclass(frozen=True)
class ModelDescription:
    """What one inspection learned of a model, per sample of ``seq_len`` tokens at one precision."""

    profile: ModelProfile
    blocks: str | None  # the module path of the repeated blocks' container; None when it has none
    block_count: int
    usage: tuple[tuple[str, frozenset[int]], ...]  # parameter -> blocks (START, END) that use it
    tensor_parallel: TensorParallelFindings | None = None  # None: not inspected (a bare profile)
    batch_norm: str | None = None  # its first BatchNorm layer: statistics of the whole batch (no pp, micro-batches)

    @classmethod
    def of_profile(cls, profile: ModelProfile) -> ModelDescription:
        """A profile alone (written by hand, or from elsewhere): costs, but no structure."""
        return cls(profile=profile, blocks=None, block_count=len(profile.blocks), usage=())

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def inspected(self) -> bool:
        """Whether the model's structure is known (not only its costs): only then can a plan be fitted to it."""
        return self.tensor_parallel is not None

    @property
    def sequence_parallel(self) -> bool:
        """Whether tensor parallelism may split the residual stream by position (assumed when not inspected)."""
        return self.tensor_parallel is None or self.tensor_parallel.sequence_parallel

    def tensor_parallel_layout(self, tp: int) -> TensorParallelLayout:
        """What ``tp`` workers split; an error with the reasons when nothing can be split."""
        layout, reasons = (
            (None, ("it was not inspected",)) if self.tensor_parallel is None else (self.tensor_parallel.layout(tp))
        )
        if layout is None:
            raise UsageError(f"{self.name} has no tensor-parallel structure ({'; '.join(reasons)}): use tp=1")
        return layout

    def tensor_parallel_degrees(self, candidates: list[int]) -> list[int]:
        """The degrees among ``candidates`` that split something (always 1)."""
        if self.tensor_parallel is None:
            return self.profile.tp_degrees(candidates)
        return [t for t in candidates if t == 1 or self.tensor_parallel.layout(t)[0] is not None]

    def why_not_tp(self, tp: int) -> str:
        if self.tensor_parallel is None:
            heads = f"{self.profile.num_heads} attention heads" if self.profile.num_heads else "no known head count"
            return f"{heads}, {self.profile.num_kv_heads} KV heads"
        return "; ".join(self.tensor_parallel.layout(tp)[1])

    def stage_layout(self, cuts: list[int] | tuple[int, ...]) -> StageLayout:
        """Stages cut before blocks ``cuts``: each parameter outside the blocks goes to the stages that use it."""
        bounds = [0, *cuts, self.block_count]
        last = len(bounds) - 2
        outside = []
        for name, units in self.usage:
            if self.blocks is not None and name.startswith(f"{self.blocks}."):
                continue  # a block's own parameters go where the block goes
            stages = {0 for unit in units if unit == START} | {last for unit in units if unit == END}
            for block in self._blocks_using(units):
                stages.add(next(s for s in range(last + 1) if bounds[s] <= block < bounds[s + 1]))
            outside.append((name, tuple(sorted(stages))))
        return StageLayout(cuts=tuple(cuts), traced=False, outside=tuple(outside))

    def _blocks_using(self, units: frozenset[int]) -> set[int]:
        used = {unit for unit in units if unit >= 0}
        if used and self.profile.analysed_blocks < self.block_count:  # a shortened copy stands for every block
            return set(range(self.block_count))
        return used


def describe(
    model: nn.Module,
    *,
    sample: Any,
    seq_len: int,
    precision: str = "fp32",
    name: str | None = None,
    blocks: list[nn.Module] | None = None,
) -> ModelDescription:
    """Inspect ``model`` (on any device, or the meta device) on ``sample``, one sample's inputs: one forward and
    backward on meta tensors. ``blocks``: its layer stack, when known (default: its repeated blocks). A Hugging
    Face model's attention runs as the flash kernel, or as its own when it does not take that one."""
    if precision not in DTYPES:
        raise UsageError(f"precision {precision!r} is not known: use one of {', '.join(DTYPES)}")
    name = name or type(model).__name__
    blocks = repeated_blocks(model) if blocks is None else blocks
    try:
        return _inspect(model, sample, seq_len=seq_len, precision=precision, name=name, blocks=blocks, flash=True)
    except UsageError:
        if not has_attention_choice(model):
            raise
    return _inspect(model, sample, seq_len=seq_len, precision=precision, name=name, blocks=blocks, flash=False)


def _inspect(model, sample, *, seq_len, precision, name, blocks, flash: bool) -> ModelDescription:
    """The one pass: costs, tensor-parallel structure and parameter usage recorded together."""
    state = _meta_state(model, dtype=DTYPES[precision])
    args, kwargs = _inputs_taken(model, as_call(to_meta(sample)))
    costs = _CostRecorder(model, blocks, state)
    parameters = dict(model.named_parameters())  # once: the model's parameters are walked per call
    usage = ParameterUsage(blocks, {n: t for n, t in state.items() if n in parameters})
    tensor_parallel = TensorParallelRecorder(model, blocks) if blocks else None
    modes = [m for m in (usage, tensor_parallel) if m is not None]
    for mode in modes:
        mode.attach(*((kwargs,) if mode is tensor_parallel else ()))
    try:
        with (
            torch.enable_grad(),  # the model may be first called under no_grad (evaluation)
            meta_attention(model) if flash else contextlib.nullcontext(),
            _running_statistics(model),
            FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter,
            GroupedMatmulsInBF16(),
            costs.recording(),
            contextlib.ExitStack() as stack,
        ):
            for mode in modes:
                stack.enter_context(mode)
            output = torch.func.functional_call(model, state, args, kwargs)
            for mode in modes:
                mode.detach()
            costs.forward_done(counter)
            loss_of(output).backward()
        costs.backward_done(counter)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(
            f"{name} cannot run on the meta device ({type(exc).__name__}: {exc}); "
            f"models with data-dependent control flow need a cluster plan pinned by hand"
        ) from None
    finally:
        for mode in modes:
            mode.detach()
    profile = costs.profile(name, seq_len=seq_len, precision=precision)
    return ModelDescription(
        profile=profile,
        blocks=block_container(model, blocks) if blocks else None,
        block_count=len(profile.blocks),
        usage=tuple((n, usage.used_by(n)) for n, _ in model.named_parameters()),
        tensor_parallel=tensor_parallel.findings()
        if tensor_parallel
        else TensorParallelFindings(reasons=(f"{name} has no repeated blocks",)),
        batch_norm=next(iter(batch_norm_layers(model)), None),
    )


def _inputs_taken(model: nn.Module, call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """The leading values of a batch ``(x, y)`` that the forward takes, when it does not take them all: the loop
    calls ``model(x)`` and computes the loss from the output itself."""
    args, kwargs = call
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return call
    for count in range(len(args), 0, -1):
        try:
            signature.bind(*args[:count], **kwargs)
        except TypeError:
            continue
        return args[:count], kwargs
    return call


@contextlib.contextmanager
def _running_statistics(model: nn.Module):
    """BatchNorm layers normalise by their running statistics during the pass (same cost): a batch of one sample
    has no batch statistics (``BatchNorm1d`` refuses it)."""
    training = [m for n in batch_norm_layers(model) if (m := model.get_submodule(n)).training]
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True


class _CostRecorder:
    """The bytes autograd saves and the operators run, attributed to the block running at the time."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], state: dict[str, torch.Tensor]) -> None:
        self.model, self.blocks = model, blocks
        self.names = {id(m): n for n, m in model.named_modules()}
        self.current: int | None = None
        self.saved: dict[int | None, dict[int, int]] = {}
        self.boundary: dict[int, int] = {}
        self.ops: dict[int | None, int] = {}
        self.selective: dict[int, dict[int, int]] = {}  # per block, the outputs selective recomputation keeps
        self.kept_ops: dict[int, int] = {}  # and how many operators made them
        self.parameter_storages = {t.untyped_storage()._cdata for t in state.values()}
        self.kept: list[Any] = []  # saved storages stay alive while measuring: a freed one's id is not reused

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.parameter_storages:
            self.saved.setdefault(self.current, {})[storage._cdata] = storage.nbytes()
            self.kept.append(storage)
        return tensor

    def _keep(self, output: Any) -> None:
        """The outputs of an operator selective recomputation keeps, in the running block."""
        self.kept_ops[self.current] = self.kept_ops.get(self.current, 0) + 1
        for tensor in (t for t in tensors_in(output) if torch.is_tensor(t)):
            storage = tensor.untyped_storage()
            self.selective.setdefault(self.current, {})[storage._cdata] = storage.nbytes()
            self.kept.append(storage)

    def _enter(self, index: int):
        def hook(module, args, kwargs):
            self.current = index
            first = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
            self.boundary[index] = 0 if first is None else first.numel() * first.element_size()

        return hook

    def _leave(self, module, args, output):
        self.current = None

    @contextlib.contextmanager
    def recording(self):
        recorder = self

        class CountOps(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                recorder.ops[recorder.current] = recorder.ops.get(recorder.current, 0) + 1
                out = func(*args, **(kwargs or {}))
                if recorder.current is not None and func in KEPT_OPERATORS:
                    recorder._keep(out)
                return out

        handles = []
        for index, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(self._enter(index), with_kwargs=True))
            handles.append(block.register_forward_hook(self._leave))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t), CountOps():
                yield
        finally:
            for handle in handles:
                handle.remove()

    def forward_done(self, counter: FlopCounterMode) -> None:
        self.forward = per_block(counter, self.names, self.blocks)

    def backward_done(self, counter: FlopCounterMode) -> None:
        self.total = per_block(counter, self.names, self.blocks)
        self.attention = attention_flops_of(counter, self.names, self.blocks)

    def profile(self, name: str, *, seq_len: int, precision: str) -> ModelProfile:
        forward, total, attention = self.forward, self.total, self.attention

        def part(index: int | None, params: int) -> PartProfile:
            f = forward.get(index, 0.0)
            return PartProfile(
                params=params,
                fwd_flops=f,
                bwd_flops=total.get(index, 0.0) - f,
                activation_bytes=sum(self.saved.get(index, {}).values()),
                boundary_bytes=self.boundary.get(index, 0),
                selective_activation_bytes=None
                if index is None
                else self.boundary.get(index, 0) + sum(self.selective.get(index, {}).values()),
                kept_ops=self.kept_ops.get(index, 0),
                attention_flops=attention.get(index, 0.0),
                ops=3 * self.ops.get(index, 0),  # backward runs about two operators for each forward one
            )

        *params, rest = parameters_per_block(self.model, self.blocks)
        return ModelProfile(
            name=name,
            seq_len=seq_len,
            precision=precision,
            blocks=tuple(part(i, n) for i, n in enumerate(params)),
            rest=part(None, rest),
            param_bytes=torch.finfo(DTYPES[precision]).bits // 8,
            analysed_blocks=len(params),
        )


def parameters_per_block(model: nn.Module, blocks: list[nn.Module]) -> list[int]:
    """Parameters of each block, each counted in the first block that holds it, then those of the rest."""
    seen: set[int] = set()
    counts = []
    for block in [*blocks, model]:
        owned = [p for p in block.parameters() if id(p) not in seen]
        counts.append(sum(p.numel() for p in owned))
        seen.update(id(p) for p in owned)
    return counts


def _meta_state(model: nn.Module, *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {
        n: torch.empty_like(p, device="meta", dtype=dtype if p.is_floating_point() else p.dtype).requires_grad_(
            p.requires_grad
        )
        for n, p in model.named_parameters()
    }
    state.update({n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()})
    return state
