"""This process as one worker of the job: its device, and the process group it joins (once)."""

from __future__ import annotations

import atexit
import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from onegpu.launch.clean_exit import end_cleanly_at_exit
from onegpu.launch.environment import Environment, current_environment
from onegpu.launch.external import lease_for_external_job
from onegpu.launch.flight import enable_flight_recorder
from onegpu.settings import settings


@dataclass(frozen=True)
class Worker:
    """This process as one of the devices behind the virtual device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def worker_device(local_rank: int) -> torch.device:
    """The accelerator this worker drives, or the CPU when the machine has none."""
    accel = torch.accelerator.current_accelerator()
    if accel is None or torch.accelerator.device_count() == 0:
        return torch.device("cpu")
    index = local_rank % torch.accelerator.device_count()
    torch.accelerator.set_device_index(index)
    return torch.device(accel.type, index)


def backend_for(device: torch.device) -> str:
    """The process-group backend for a device type (nccl for cuda, gloo for cpu, ...)."""
    return dist.get_default_backend_for_device(device)


def running_backend(device: torch.device) -> str:
    """The backend the process group runs ``device``'s collectives on: one name even when the group was created
    for several device types (Accelerate's, built before onegpu's: ``cpu:gloo,cuda:nccl``)."""
    name = dist.get_backend()
    if name != "undefined":
        return name
    per_device = dict(part.split(":") for part in str(dist.get_backend_config()).split(",") if ":" in part)
    return per_device.get(device.type, name)


def collective_timeout() -> float:
    """Seconds a collective may wait for its peers before the job is stopped (ONEGPU_COLLECTIVE_TIMEOUT)."""
    return settings().collective_timeout_s


_WORKER: Worker | None = None


def current_worker(environment: Environment | None = None) -> Worker:
    """Join the job's process group once (when there is more than one worker) and describe this worker; in a job
    torchrun or srun started, the first worker of each machine leases the machine's devices (launch/external.py)."""
    global _WORKER
    if _WORKER is not None:
        return _WORKER
    env = environment or current_environment()
    device = worker_device(env.local_rank)
    if env.is_distributed and not dist.is_initialized():
        env.export()
        enable_flight_recorder()  # every collective recorded, for the report of a hang (launch/flight.py)
        dist.init_process_group(
            backend=backend_for(device),
            # twice the watchdog's limit: the watchdog's report, naming the phase, comes first
            timeout=datetime.timedelta(seconds=2 * collective_timeout()),
            device_id=device if device.type != "cpu" else None,
        )
        end_cleanly_at_exit()  # under another launcher; onegpu's own workers end with clean_exit.finish
        # leave the group before the interpreter tears down: gloo's threads abort the process otherwise
        atexit.register(_leave_process_group)
    lease_for_external_job(env)  # torchrun's or srun's job: leased in the pool's ledger (not onegpu run's workers)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = env.rank, env.world_size
    _WORKER = Worker(
        rank=rank,
        world_size=world,
        local_rank=env.local_rank,
        local_world_size=env.local_world_size,
        device=device,
    )
    return _WORKER


def join_alone(device: torch.device) -> None:
    """A process group of this one process (in memory, no network), for a single worker whose layout is built on
    torch.distributed (mixed precision's units); nothing when a group exists already."""
    if dist.is_initialized():
        return
    dist.init_process_group(backend=backend_for(device), store=dist.HashStore(), rank=0, world_size=1)
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on the worker that speaks for the job (rank 0): write files and logs there."""
    return current_worker().is_main
