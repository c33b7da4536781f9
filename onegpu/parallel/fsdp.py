"""Full sharding (ZeRO-3) with FSDP2: parameters, gradients and optimizer state split over workers."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from onegpu.parallel.blocks import repeated_blocks


def apply_fsdp(model: nn.Module, *, mesh: DeviceMesh) -> nn.Module:
    """Shard each repeated block, then the rest of the model, in place."""
    blocks = repeated_blocks(model)
    for index, block in enumerate(blocks):
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, mesh=mesh, reshard_after_forward=index < len(blocks) - 1)
    fully_shard(model, mesh=mesh)
    return model
