"""A loop whose script all-reduces a logged value every step, except once on rank 1, which goes on to a slow
step of its own instead: the other workers wait in that all-reduce. skip_all_reduce.py"""

import time

import torch
import torch.distributed as dist

import onegpu

onegpu.init()
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = onegpu.prepare(model, optimizer)
rank = dist.get_rank()


def write_summary_alone() -> None:
    time.sleep(600)  # slow work of rank 1 alone, e.g. a file on a stalled disk


for step in range(4):
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    logged = loss.detach().clone()
    if rank == 1 and step == 2:
        write_summary_alone()  # skips this step's all-reduce
    else:
        dist.all_reduce(logged)
