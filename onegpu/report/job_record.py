"""Everything the run report shows of one job, read once: its record (job.json, plan.json, metrics), the measured
pipeline timeline, the hang doctor's diagnosis and the pool ledger's lease intervals. A part that was not recorded
(or that this onegpu cannot read) is None, with the reason in ``missing``: the report says so and goes on."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onegpu.errors import UsageError
from onegpu.plan import Plan
from onegpu.pool.config import onegpu_home, pool_settings
from onegpu.pool.ledger import open_ledger
from onegpu.pool.ledger_rows import Interval
from onegpu.report import records


@dataclass(frozen=True)
class JobRecord:
    """One job as the report sees it; ``missing`` maps a part (timeline, diagnosis, leases) to why it is absent."""

    name: str
    directory: Path  # timeline: None when not recorded; diagnosis: "" or None when the doctor found nothing wrong
    job: dict[str, Any]
    plan: Plan | None
    metrics: list[dict[str, Any]]
    timeline: dict[str, Any] | None = None
    diagnosis: str | None = None
    leases: tuple[Interval, ...] = ()
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        """Whether the job had not ended when it was read (no end written in job.json)."""
        return not self.job.get("ended")


def read_record(directory: Path) -> JobRecord:
    """The job in ``directory`` (see :func:`onegpu.report.records.job_dir`), as far as it was recorded."""
    directory = Path(directory)
    job = records.read_job(directory)
    name = str(job.get("job") or directory.name)
    missing: dict[str, str] = {}
    timeline = _optional("timeline", "read_timeline", directory, missing)
    diagnosis = _optional("doctor", "diagnose", directory, missing)
    try:
        leases = tuple(i for i in _ledger_intervals(directory) if i.job == name)
    except UsageError as error:  # no ledger where the job's home is, or one that cannot be opened
        leases, missing["leases"] = (), f"the pool ledger could not be read: {error}"
    if not leases and "leases" not in missing:
        missing["leases"] = "no lease of this job in the pool ledger (a single process, or another ledger)"
    return JobRecord(
        name=name,
        directory=directory,
        job=job,
        plan=records.read_plan(directory),
        metrics=records.read_metrics(directory),
        timeline=timeline,
        diagnosis=diagnosis,
        leases=leases,
        missing=missing,
    )


def _optional(module: str, function: str, directory: Path, missing: dict[str, str]) -> Any:
    """``onegpu.report.<module>.<function>(directory)``, or None (reason in ``missing``) where this onegpu has no
    such reader or the job recorded nothing for it."""
    try:
        reader = getattr(importlib.import_module(f"onegpu.report.{module}"), function)
    except (ImportError, AttributeError):
        missing[module] = f"not recorded: this onegpu has no {module} reader"
        return None
    return reader(directory)


def _ledger_intervals(directory: Path) -> list[Interval]:
    """The ledger of the home the job ran in (``<home>/jobs/<job>``), else of this ``ONEGPU_HOME``."""
    home = directory.parent.parent if directory.parent.name == "jobs" else onegpu_home()
    pool = pool_settings(home)
    if pool.database_url is None and not (home / "ledger.sqlite").is_file():
        raise UsageError(f"no ledger in {home}")
    return open_ledger(url=pool.database_url, home=home, ttl_s=pool.lease_ttl_s).intervals()
