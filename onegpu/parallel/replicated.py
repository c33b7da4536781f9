"""Replicated data parallelism on DDP's C++ reducer (``torch.distributed._composable.replicate``).

Every replica holds the whole model as plain tensors; gradients are all-reduced in 25 MB buckets while
backward runs (the last layers' first), the reduction overlapping the rest of backward. Replicas SUM
their gradients, as under FSDP2 (:mod:`onegpu.parallel.data_parallel`). The model keeps its class
(a subclass, like FSDP2's) and its parameters; ``set_requires_gradient_sync`` skips the reduction
of a backward, as FSDP2's does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def apply_replicated(module: nn.Module, *, mesh: DeviceMesh) -> None:
    """Make ``module`` a replica over ``mesh`` (one dimension), in place."""
    from torch.distributed._composable.replicate import replicate

    group = mesh.get_group()
    replicate(
        module,
        process_group=group,
        device_id=_device_id(mesh),
        gradient_as_bucket_view=True,  # no copy out of the buckets
        forward_sync_buffers=False,  # equal on every replica already (rank 0's at prepare; global batch norm)
        find_unused_parameters=True,  # a model may leave parameters out of a call (FSDP2 allows it too)
    )
    module.register_comm_hook(group, _sum)


def is_replicated(module: nn.Module) -> bool:
    from torch.distributed._composable.replicate import DDP

    return isinstance(module, DDP)


def build_replicas_now(model: nn.Module) -> None:
    """DDP builds its reducer at the first forward, a collective (the replicas check their parameters): build it
    now, while every worker takes part, before replicas that make their own calls (one may make none)."""
    from torch.distributed._composable.replicate import replicate

    for module in model.modules():
        if is_replicated(module) and replicate.state(module)._init_args:
            replicate.state(module).lazy_init()


def reduce_gradients(module: nn.Module) -> None:
    """Sum the gradients accumulated without reduction across the replicas now, as a backward would have."""
    from torch.distributed._composable.replicate import replicate

    state = replicate.state(module)
    grads = [p.grad for p in module.parameters() if p.grad is not None]  # a shared one once
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=state._ddp.process_group)
        for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(part.view_as(grad))


def split_reduced_gradients(module: nn.Module) -> None:
    """Gradients reduced already (the same on every replica) made each replica's equal share of them, before a
    backward whose reduction sums all that each replica accumulated: they are then counted once."""
    from torch.distributed._composable.replicate import replicate

    replicas = replicate.state(module)._ddp.process_group.size()
    for parameter in module.parameters():  # a shared one once
        if parameter.grad is not None:
            parameter.grad.div_(replicas)


def _sum(group, bucket):
    """DDP's communication hook that sums, where its default averages (DDP checks the annotations' objects,
    which this module's postponed annotations are not: none)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda done: done.value()[0])


def _device_id(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())
