"""Each worker reports its device's memory use and utilization to the ledger, for ``onegpu smi``."""

from __future__ import annotations

import os
import threading
import time

import torch

REPORT_EVERY_S = 2.0


def resident_bytes() -> int:
    """This process's resident memory, in bytes."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def start_reporting() -> None:
    """In a worker of a job that leased devices: report every few seconds, in a daemon thread."""
    job, devices = os.environ.get("ONEGPU_JOB"), os.environ.get("ONEGPU_DEVICES")
    if not job or not devices:
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = int(devices.split(",")[local])

    def report() -> None:
        from onegpu.pool.config import load_pool
        from onegpu.pool.lease import pool_ledger

        ledger = pool_ledger(load_pool())
        accelerator = torch.accelerator.is_available()
        wall, cpu = time.monotonic(), time.process_time()
        while True:
            time.sleep(REPORT_EVERY_S)
            now_wall, now_cpu = time.monotonic(), time.process_time()
            if accelerator and torch.cuda.is_available():
                memory = float(torch.cuda.memory_reserved(local))
                utilization = float(torch.cuda.utilization(local)) / 100
            else:  # a CPU slot: the process's memory, and its share of its threads' time
                memory = float(resident_bytes())
                utilization = min(1.0, (now_cpu - cpu) / max(1e-9, now_wall - wall) / torch.get_num_threads())
            wall, cpu = now_wall, now_cpu
            try:
                ledger.report(job=job, device=device, memory_bytes=memory, utilization=utilization)
            except Exception:  # noqa: BLE001 - reporting must never disturb training
                pass

    threading.Thread(target=report, name="onegpu-report", daemon=True).start()
