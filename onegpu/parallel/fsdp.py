"""Sharding with FSDP2: gradients and optimizer state (ZeRO-2), or parameters too (ZeRO-3), split over workers."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

from onegpu.parallel.blocks import repeated_blocks


def apply_fsdp(
    model: nn.Module,
    *,
    mesh: DeviceMesh,
    shard_parameters: bool = True,
    offload: bool = False,
    blocks: list[nn.Module] | None = None,
) -> nn.Module:
    """Shard each block (by default the repeated ones), then the rest of the model, in place.

    ``shard_parameters=False`` keeps parameters gathered from forward to backward (ZeRO-2:
    only gradients and optimizer state stay sharded); ``offload`` keeps the shards of
    parameters, gradients and optimizer state in host memory.
    """
    policy = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if offload else OffloadPolicy()
    blocks = repeated_blocks(model) if blocks is None else blocks
    for index, block in enumerate(blocks):
        # the last block's parameters are needed again at once by backward: keep them gathered
        reshard = shard_parameters and index < len(blocks) - 1
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, offload_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=shard_parameters, offload_policy=policy)
    return model
