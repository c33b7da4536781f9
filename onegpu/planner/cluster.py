"""The cluster the planner plans for, from a preset, ``local`` (this machine, measured) or a YAML file.

The types live in ``hardware``, the presets in ``cluster_presets``, the file format in ``cluster_yaml``
and the measurement in ``cluster_measure``.
"""

from __future__ import annotations

import os
from pathlib import Path

from onegpu.errors import UsageError
from onegpu.planner.cluster_measure import measure_job_cluster, measure_local_cluster
from onegpu.planner.cluster_presets import PRESETS
from onegpu.planner.cluster_yaml import cluster_from_dict, read_yaml
from onegpu.planner.hardware import Cluster, DeviceSpec, Link

__all__ = ["PRESETS", "Cluster", "DeviceSpec", "Link", "load_cluster", "measure_job_cluster", "measure_local_cluster"]


def load_cluster(spec: str, *, nodes: int | None = None, devices_per_node: int | None = None) -> Cluster:
    """A preset (any case), ``local`` (this machine, measured once and cached) or a cluster YAML file.

    ``nodes``/``devices_per_node`` override the spec's. For ``local``, ``devices_per_node`` is the
    number of worker processes to measure (default 2).
    """
    key = spec.strip().lower()
    if key == "local":
        return measure_local_cluster(workers=devices_per_node or 2).with_overrides(nodes=nodes)
    if key in PRESETS:
        return PRESETS[key].with_overrides(nodes=nodes, devices_per_node=devices_per_node)
    path = Path(spec).expanduser()
    if not path.is_file():
        names = ", ".join([*PRESETS, "local"])
        if path.suffix in (".yaml", ".yml") or os.sep in spec or path.exists():
            raise UsageError(
                f"cluster file {spec} does not exist or is not a file: check the path, or use a preset ({names})"
            )
        raise UsageError(
            f"{spec!r} is not a cluster preset ({names}): use one of them or the path to a cluster YAML file"
        )
    try:
        cluster = cluster_from_dict(read_yaml(path), name=path.stem)
    except UsageError as error:
        raise UsageError(f"{path}: {error}") from None
    return cluster.with_overrides(nodes=nodes, devices_per_node=devices_per_node)
