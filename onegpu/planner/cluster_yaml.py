"""The cluster YAML file: exactly the fields of ``Cluster.to_dict()``; errors name the field and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from onegpu.errors import UsageError
from onegpu.planner.hardware import Cluster, DeviceSpec, Link, check_peaks, check_positive

DEVICE_FIELDS = ("name", "memory_gb", "peak_tflops", "memory_bandwidth_gbps")
LINK_FIELDS = ("bandwidth_gbps", "latency_us")
CLUSTER_FIELDS = ("device", "nodes", "devices_per_node", "intra_node", "inter_node")


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read the file ({error}): check its permissions and that it is UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "somewhere"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"invalid YAML at {where} ({problem}): fix the syntax there") from None


def cluster_from_dict(data: Any, *, name: str = "") -> Cluster:
    """A Cluster from the YAML file's fields; errors name the field and what it must be."""
    data = _exact_fields(data, CLUSTER_FIELDS, "cluster")
    for key in ("nodes", "devices_per_node"):
        check_positive(data[key], key, integer=True)
    return Cluster(
        device=_device_from_dict(data["device"]),
        nodes=data["nodes"],
        devices_per_node=data["devices_per_node"],
        intra_node=_link_from_dict(data["intra_node"], "intra_node"),
        inter_node=_link_from_dict(data["inter_node"], "inter_node"),
        name=name,
    )


def _device_from_dict(data: Any) -> DeviceSpec:
    data = _exact_fields(data, DEVICE_FIELDS, "device")
    if not isinstance(data["name"], str) or not data["name"]:
        raise UsageError(f"device.name must be a non-empty string, got {data['name']!r}")
    check_positive(data["memory_gb"], "device.memory_gb")
    check_peaks(data["peak_tflops"], "device.peak_tflops")
    check_positive(data["memory_bandwidth_gbps"], "device.memory_bandwidth_gbps")
    return DeviceSpec(**data)


def _link_from_dict(data: Any, where: str) -> Link:
    data = _exact_fields(data, LINK_FIELDS, where)
    for key in LINK_FIELDS:
        check_positive(data[key], f"{where}.{key}")
    return Link(**data)


def _exact_fields(data: Any, expected: tuple[str, ...], where: str) -> dict:
    fields = ", ".join(expected)
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a mapping with fields {fields}, got {data!r}")
    for key in data:
        if key not in expected:
            raise UsageError(f"unknown field {key!r} in {where}: expected fields {fields}")
    for key in expected:
        if key not in data:
            raise UsageError(f"missing field {key!r} in {where}: expected fields {fields}")
    return data
