"""Jobs started by another launcher (``torchrun``, SLURM's ``srun``) lease their devices in the pool's ledger too.

When such a job calls ``onegpu.init()`` or ``onegpu.prepare``, one process per machine (local rank 0) leases
that machine's devices (one per local worker) under a name every rank derives from its launcher's variables:

- torchrun: ``<user>-torchrun-<run id>`` (``--rdzv-id``; ``--standalone`` makes a UUID, of which the first 8
  hex digits are kept); with torchrun's default run id ``none``, ``<user>-torchrun-<MASTER_ADDR>-<MASTER_PORT>-
  <launcher pid>`` (the agent's pid, shared by the workers of one machine only);
- SLURM: ``<user>-slurm-<SLURM_JOB_ID>[.<SLURM_STEP_ID>]``.

The lease is held (renewed by a thread) while the process lives and released at its exit; a process killed
without exiting (SIGKILL, or torchrun's SIGTERM when another worker failed) leaves it to expire after the pool's
``lease_ttl_s``, or to be ended when the job, restarted, leases again. The other local ranks take nothing. When the
pool's devices are held, the job waits in line (the other ranks wait in their first collective). A job larger
than the pool, or a ledger that cannot be used, costs one warning: the job runs without a lease. Workers of
``onegpu run`` (whose launcher holds their lease) and a single process take none.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import os
import re
import sys
import uuid
from collections.abc import Mapping

from onegpu.errors import UsageError
from onegpu.launch.environment import Environment
from onegpu.pool.config import load_pool
from onegpu.pool.lease import JobLease, leased_devices
from onegpu.settings import settings

_held = contextlib.ExitStack()
_lease: list[JobLease] = []  # the one lease this process holds for its job


def external_job_name(environment: Environment, variables: Mapping[str, str]) -> str | None:
    """The name every rank of a job started by torchrun or srun gives it, without talking to the others; None for
    a single process and for the workers of ``onegpu run``."""
    if not environment.is_distributed or settings().launched:
        return None
    user = getpass.getuser()
    if environment.kind == "slurm":
        step = variables.get("SLURM_STEP_ID")
        return f"{user}-slurm-{_part(variables.get('SLURM_JOB_ID', 'none'))}" + (f".{_part(step)}" if step else "")
    run_id = variables.get("TORCHELASTIC_RUN_ID", "none")
    if run_id == "none":  # torchrun's default: what one launch shares on this machine
        return f"{user}-torchrun-{_part(environment.master_addr)}-{environment.master_port}-{os.getppid()}"
    with contextlib.suppress(ValueError):
        run_id = uuid.UUID(run_id).hex[:8]  # --standalone's run id
    return f"{user}-torchrun-{_part(run_id)}"


def _part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", text)


def lease_for_external_job(environment: Environment, variables: Mapping[str, str] | None = None) -> JobLease | None:
    """On local rank 0 of a job another launcher started: lease this machine's devices for the job until this
    process exits (waiting in line when they are held). Anything else, or a lease that cannot be taken: None."""
    variables = os.environ if variables is None else variables
    job = external_job_name(environment, variables)
    if job is None or environment.local_rank != 0 or _lease:
        return None
    count = environment.local_world_size
    try:
        pool = load_pool()
        if count > len(pool.devices):
            _warn(
                f"job {job} runs without a device lease: its {count} workers on this machine are more than the "
                f"{len(pool.devices)} devices of its pool ({pool.path}); onegpu smi and usage do not see it"
            )
            return None
        lease = _held.enter_context(leased_devices(count=count, job=job, on_lost=_lost))
    except UsageError as exc:  # no usable home, pool file or ledger: the job itself must not fail for it
        _warn(f"job {job} runs without a device lease ({exc})")
        return None
    _lease.append(lease)
    atexit.register(release_external_lease)
    return lease


def release_external_lease() -> None:
    """End the lease ``lease_for_external_job`` took (at exit; nothing when there is none)."""
    _held.close()
    _lease.clear()


def _lost(reason: str) -> None:
    why = reason.partition(" s: ")[2] or reason
    _warn(f"the job's device leases could not be renewed ({why}): they lapse; the job runs on, unseen by onegpu smi")


def _warn(message: str) -> None:
    print(f"onegpu: warning: {message}", file=sys.stderr, flush=True)
