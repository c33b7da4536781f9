"""A pipeline's measured timeline: when each worker ran each micro-batch's forward, backward and messages.

For a few training calls after the first (``RECORDED_CALLS``: the first builds the stages' buffers), every
worker of a pipelined plan under ``onegpu run`` notes the start and end (``time.time_ns``) of each forward,
backward (input and weight gradients apart under zero-bubble), loss and wait on a send or receive, per stage and
micro-batch, and writes them to ``<job dir>/timeline/rank-<N>.json`` after each such call
(:mod:`onegpu.report.timeline` reads them). Outside ``onegpu run`` nothing is recorded.

The hooks are torch's own seams, installed for the recorded calls only and removed after them: the stage's
``forward_one_chunk``, ``backward_one_chunk`` and ``backward_weight_one_chunk`` and the ``get_*_ops`` that make
its messages (methods of this worker's ``PipelineStage`` objects), the schedule's loss function, and
``schedules._batch_p2p``, through which every schedule posts its messages (its works are handed back timed: a
wait is when a worker idles for a neighbour). On an accelerator each event is closed by a synchronisation
(during the recorded calls only), so the host clock measures the device's work.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import schedules as torch_schedules

from onegpu.plan import Plan
from onegpu.settings import settings

RECORDED_CALLS = range(2, 5)  # the 2nd to 4th training calls: after the warm-up, and a bounded cost
DIRECTORY = "timeline"
COMPUTE = {"forward_one_chunk": "forward", "backward_weight_one_chunk": "backward weight"}
MESSAGES = {"get_fwd_recv_ops": ("recv", "forward"), "get_bwd_recv_ops": ("recv", "backward"),
            "get_fwd_send_ops": ("send", "forward"), "get_bwd_send_ops": ("send", "backward")}  # fmt: skip
TAG = "onegpu_timeline"  # the attribute that names a message's event on torch's P2POp


class TimelineRecorder:
    """Records this worker's pipeline events for the calls in ``RECORDED_CALLS``, and writes them."""

    def __init__(self, *, directory: Path, rank: int, plan: Plan, stages: list[int], device: torch.device) -> None:
        self.path = directory / DIRECTORY / f"rank-{rank}.json"
        self.rank, self.plan, self.stages, self.device = rank, plan, stages, device
        self.synchronize = device.type != "cpu"
        self.calls, self.step, self.barrier_ns = 0, 0, 0
        self.steps: list[dict[str, int]] = []
        self.events: list[dict[str, Any]] = []

    @classmethod
    def for_worker(cls, *, rank: int, plan: Plan, stages: list[int], device: torch.device) -> TimelineRecorder | None:
        """A recorder under ``onegpu run`` (its job directory), None elsewhere."""
        status = settings().status_dir
        return None if status is None else cls(directory=status, rank=rank, plan=plan, stages=stages, device=device)

    @contextmanager
    def training_call(self, schedule: Any) -> Iterator[None]:
        """Around one training call's ``schedule.step``: records it if it is one of ``RECORDED_CALLS``. Every
        worker makes the same calls, so the first recorded one starts with a barrier all of them leave together
        (its time aligns the clocks of workers on different hosts)."""
        self.calls += 1
        if self.calls not in RECORDED_CALLS:
            yield
            return
        if not self.barrier_ns:
            self.barrier_ns = self._barrier()
        with ExitStack() as hooks:
            try:
                self._install(schedule, step=self.calls, hooks=hooks)
            except AttributeError:  # a torch whose schedules keep their stages elsewhere: train on, unrecorded
                hooks.close()
                yield
                return
            start = self._now()
            yield
            end = self._now()
        self.steps.append({"step": self.calls, "start_ns": start, "end_ns": end})
        try:
            self._write()
        except OSError:  # the record must never stop the training
            pass

    # --- hooks -----------------------------------------------------------------------------------------
    def _install(self, schedule: Any, *, step: int, hooks: ExitStack) -> None:
        stages = getattr(schedule, "_stages", None) or [schedule._stage]
        for stage in stages:
            for name, kind in COMPUTE.items():
                self._wrap(
                    stage, name, hooks, lambda mb, *a, kind=kind, stage=stage, **k: (kind, stage.stage_index, mb)
                )
            self._wrap(stage, "backward_one_chunk", hooks, self._backward_kind(stage))
            for name, (direction, of) in MESSAGES.items():
                self._tag_messages(stage, name, hooks, direction=direction, of=of)
        self.step = step
        loss_fn = getattr(schedule, "_loss_fn", None)
        if loss_fn is not None:
            last = max(stage.stage_index for stage in stages)
            counter = itertools.count()  # the schedule computes the losses in micro-batch order
            self._set(schedule, "_loss_fn", self._timed(loss_fn, lambda *a, **k: ("loss", last, next(counter))), hooks)
        if hasattr(torch_schedules, "_batch_p2p"):  # every schedule posts its messages through it
            self._set(torch_schedules, "_batch_p2p", self._timed_messages(torch_schedules._batch_p2p), hooks)

    @staticmethod
    def _backward_kind(stage: Any) -> Callable[..., tuple[str, int, int]]:
        def kind(mb: int, *args: Any, full_backward: bool = True, **kwargs: Any) -> tuple[str, int, int]:
            return ("backward" if full_backward else "backward input", stage.stage_index, mb)

        return kind

    def _wrap(self, stage: Any, name: str, hooks: ExitStack, describe: Callable) -> None:
        if hasattr(stage, name):
            self._set(stage, name, self._timed(getattr(stage, name), describe), hooks)

    @staticmethod
    def _set(owner: Any, name: str, value: Any, hooks: ExitStack) -> None:
        """``owner.name = value`` until the recorded call ends (an instance's own attribute is deleted then)."""
        own = name in vars(owner)
        before = vars(owner).get(name)
        setattr(owner, name, value)
        hooks.callback(lambda: setattr(owner, name, before) if own else delattr(owner, name))

    def _timed(self, function: Callable, describe: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            kind, stage, mb = describe(*args, **kwargs)
            start = self._now()
            result = function(*args, **kwargs)
            self._event(kind, stage=stage, mb=mb, start=start, end=self._now())
            return result

        return timed

    def _tag_messages(self, stage: Any, name: str, hooks: ExitStack, *, direction: str, of: str) -> None:
        original = getattr(stage, name)

        def tagged(mb: int, *args: Any, **kwargs: Any) -> list:
            ops = original(mb, *args, **kwargs)
            for op in ops:
                setattr(op, TAG, (f"{direction} {of}", stage.stage_index, mb, int(op.peer)))
            return ops

        self._set(stage, name, tagged, hooks)

    def _timed_messages(self, batch_p2p: Callable) -> Callable:
        def timed_batch(p2p_ops: list, *args: Any, **kwargs: Any) -> list:
            start = self._now()
            works = batch_p2p(p2p_ops, *args, **kwargs)
            end = self._now()
            tags = [getattr(op, TAG, None) for op in p2p_ops]
            for kind, stage, mb, peer in filter(None, tags):
                self._event(kind, stage=stage, mb=mb, start=start, end=end, peer=peer, phase="post")
            if len(works) != len(tags):  # one work for a coalesced batch (NCCL): it stands for all its messages
                return [_TimedWork(work, [t for t in tags if t], self) for work in works]
            return [_TimedWork(work, [tag] if tag else [], self) for work, tag in zip(works, tags, strict=True)]

        return timed_batch

    # --- events -----------------------------------------------------------------------------------------
    def _now(self) -> int:
        if self.synchronize:
            torch.accelerator.synchronize()
        return time.time_ns()

    def _event(self, kind: str, *, stage: int, mb: int, start: int, end: int, **message: Any) -> None:
        """One event; a message's also names its ``peer`` (global rank) and ``phase``: posted, or waited for."""
        event = {"kind": kind, "stage": stage, "microbatch": mb, "step": self.step, "start_ns": start, "end_ns": end}
        event.update(message)
        self.events.append(event)

    def _barrier(self) -> int:
        flag = torch.zeros(1, device=self.device)
        dist.all_reduce(flag)
        return self._now()

    def _write(self) -> None:
        record = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "stages": self.stages,
            "pp": self.plan.pp,
            "num_stages": self.plan.pipeline_stages,
            "schedule": self.plan.schedule,
            "microbatches": self.plan.microbatches,
            "device": self.device.type,
            "synchronized": self.synchronize,
            "barrier_ns": self.barrier_ns,
            "steps": self.steps,
            "events": self.events,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        staging.write_text(json.dumps(record))
        os.replace(staging, self.path)  # a reader sees the old file or the new one, never half of one


class _TimedWork:
    """A message's work whose ``wait`` is recorded as that message's event (sends' and receives' alike)."""

    def __init__(self, work: Any, tags: list[tuple], recorder: TimelineRecorder) -> None:
        self.work, self.tags, self.recorder = work, tags, recorder

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        start = self.recorder._now()
        result = self.work.wait(*args, **kwargs)
        end = self.recorder._now()
        for kind, stage, mb, peer in self.tags:
            self.recorder._event(kind, stage=stage, mb=mb, start=start, end=end, peer=peer, phase="wait")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.work, name)
