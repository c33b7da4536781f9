"""Each worker reports its memory every few seconds: its device's use and utilization to the ledger, for
``onegpu smi``, and its process's memory to the job's status directory, for the launcher's report of a
worker killed by the system (possibly for lack of memory)."""

from __future__ import annotations

import os
import resource
import sys
import threading
import time

import torch

from onegpu.launch.status import record_memory
from onegpu.machine import resident_bytes
from onegpu.settings import settings

REPORT_EVERY_S = 2.0


def peak_resident_bytes() -> int:
    """The most resident memory this process has used, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # kilobytes on Linux


def start_reporting() -> None:
    """In a worker of ``onegpu run``: report every few seconds, in a daemon thread."""
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    job, devices = settings().job, settings().devices
    device = devices[local] if job and devices else None

    def report() -> None:
        ledger = _ledger() if device is not None else None
        wall, cpu, peak = time.monotonic(), time.process_time(), 0
        while True:
            try:
                resident = resident_bytes()
                peak = max(peak, resident, peak_resident_bytes())  # the kernel updates its peak lazily
                record_memory(rank=rank, resident=resident, peak=peak, device_peak=_device_peak(local))
            except OSError:  # reporting must never disturb training
                pass
            time.sleep(REPORT_EVERY_S)
            now_wall, now_cpu = time.monotonic(), time.process_time()
            if ledger is not None:
                busy = (now_cpu - cpu) / max(1e-9, now_wall - wall) / torch.get_num_threads()
                _report_device(ledger, job=job, device=device, local=local, cpu_busy=busy)
            wall, cpu = now_wall, now_cpu

    threading.Thread(target=report, name="onegpu-report", daemon=True).start()


def _device_peak(local: int) -> float | None:
    """The most memory this process has allocated on its accelerator (None on CPU; not run on a GPU yet)."""
    try:
        if not torch.accelerator.is_available():
            return None
        return float(torch.accelerator.max_memory_allocated(local % torch.accelerator.device_count()))
    except Exception:  # noqa: BLE001 - reporting must never disturb training
        return None


def _ledger():
    from onegpu.pool.config import pool_settings
    from onegpu.pool.lease import pool_ledger

    try:
        return pool_ledger(pool_settings())  # the ledger alone: a worker never connects to a Ray cluster
    except Exception:  # noqa: BLE001 - the launcher reports a broken ledger; a worker trains on
        return None


def _report_device(ledger, *, job: str, device: int, local: int, cpu_busy: float) -> None:
    try:
        if torch.accelerator.is_available():  # the memory this process holds on its device, and how busy it is
            index = local % torch.accelerator.device_count()  # the worker's device (launch/process_group.py)
            memory, utilization = float(torch.accelerator.memory_reserved(index)), _utilization(index)
        else:  # a CPU slot: the process's memory, and its share of its threads' time
            memory, utilization = float(resident_bytes()), min(1.0, cpu_busy)
        ledger.report(job=job, device=device, memory_bytes=memory, utilization=utilization)
    except Exception:  # noqa: BLE001 - reporting must never disturb training
        pass


def _utilization(index: int) -> float:
    """The device's busy share (CUDA, through NVML when installed); 0 where the runtime does not say."""
    try:
        return float(torch.cuda.utilization(index)) / 100 if torch.cuda.is_available() else 0.0
    except Exception:  # noqa: BLE001 - no pynvml, or a driver without NVML: report the memory anyway
        return 0.0
