"""Which reducer a data-parallel plan gets: replicated fp32 plans DDP's C++ reducer (plain tensors, buckets
reduced while backward runs), every other plan FSDP2 (one process group of one worker is enough to see it)."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from onegpu.parallel.data_parallel import apply_data_parallel
from onegpu.parallel.replicated import is_replicated
from onegpu.plan import Plan


def test_replicated_fp32_plans_reduce_on_ddps_reducer_and_sharded_ones_on_fsdp2(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        replicated, sharded = (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)) for _ in range(2))
        apply_data_parallel(replicated, mesh=mesh, plan=Plan(dp=1), blocks=[replicated[0], replicated[2]])
        apply_data_parallel(sharded, mesh=mesh, plan=Plan(dp=1, sharding="gradients"), blocks=[sharded[0]])

        assert is_replicated(replicated) and isinstance(replicated, nn.Sequential), "the model keeps its class"
        assert not any(isinstance(p, DTensor) for p in replicated.parameters()), "plain tensors for the optimizer"
        assert not is_replicated(sharded) and isinstance(sharded, FSDPModule)
        replicated(torch.ones(2, 4)).sum().backward()
        assert all(p.grad is not None for p in replicated.parameters())
    finally:
        dist.destroy_process_group()
