"""The cluster description: presets, YAML files, overrides and the measured local machine."""

import dataclasses
import json

import pytest
import yaml

from onegpu.errors import UsageError
from onegpu.planner import cluster_measure as cluster_module
from onegpu.planner.cluster import (
    PRESETS,
    Cluster,
    DeviceSpec,
    Link,
    load_cluster,
    measure_local_cluster,
)

EXAMPLE = """\
device: {name: a100-80gb, memory_gb: 80, peak_tflops: {bf16: 312, fp32: 19.5}, memory_bandwidth_gbps: 2039}
nodes: 4
devices_per_node: 8
intra_node: {bandwidth_gbps: 300, latency_us: 3}
inter_node: {bandwidth_gbps: 25, latency_us: 5}
"""
CLUSTER_FIELDS = "expected fields device, nodes, devices_per_node, intra_node, inter_node"


def write(tmp_path, text, name="cluster.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def example_with(**changes) -> str:
    """The example file with top-level fields replaced (None removes one)."""
    data = yaml.safe_load(EXAMPLE)
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return yaml.safe_dump(data)


def usage_error(spec: str) -> str:
    with pytest.raises(UsageError) as caught:
        load_cluster(spec)
    message = str(caught.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


# --- presets --------------------------------------------------------------------------------


def test_presets_cover_the_common_datacenter_accelerators():
    assert {"a100-40gb", "a100-80gb", "h100-80gb", "h200", "mi250x", "mi300x"} <= set(PRESETS)
    for name, preset in PRESETS.items():
        assert preset.name == name
        assert (preset.nodes, preset.devices_per_node, preset.world_size) == (1, 8, 8)


def test_preset_figures_are_the_datasheets_dense_figures():
    a100, h100 = PRESETS["a100-80gb"].device, PRESETS["h100-80gb"].device
    assert a100.peak_flops("bf16") == 312e12
    assert a100.peak_flops("fp32") == 19.5e12
    assert h100.peak_flops("bf16") > 3 * a100.peak_flops("bf16")  # dense, not the 2x sparsity figure
    assert h100.peak_flops("bf16") < 1000e12
    assert PRESETS["mi300x"].device.peak_flops("bf16") > h100.peak_flops("bf16")


def test_preset_memory_and_bandwidths_are_sane():
    for name in ("a100-80gb", "h100-80gb"):
        assert 75e9 <= PRESETS[name].memory_bytes <= 90e9  # the "80 GB" class
    assert PRESETS["a100-40gb"].memory_bytes == 40 * 10**9  # decimal GB, as on datasheets
    assert PRESETS["h200"].memory_bytes > PRESETS["h100-80gb"].memory_bytes
    assert PRESETS["h200"].device.memory_bandwidth_gbps > PRESETS["h100-80gb"].device.memory_bandwidth_gbps
    assert PRESETS["a100-80gb"].intra_node.bandwidth_gbps == 300  # NVLink 3, per direction
    assert PRESETS["h100-80gb"].intra_node.bandwidth_gbps == 450  # NVLink 4, per direction
    assert PRESETS["a100-80gb"].inter_node.bandwidth_gbps == 25  # one 200 Gb/s HDR NIC per GPU
    assert PRESETS["h100-80gb"].inter_node.bandwidth_gbps == 50  # one 400 Gb/s NDR NIC per GPU
    for preset in PRESETS.values():
        device = preset.device
        assert device.memory_bandwidth_gbps > preset.intra_node.bandwidth_gbps > preset.inter_node.bandwidth_gbps
        assert 1 <= preset.intra_node.latency_us <= preset.inter_node.latency_us <= 10
        assert device.peak_tflops["bf16"] > device.peak_tflops["fp32"]


def test_preset_names_are_case_insensitive():
    assert load_cluster("H100-80GB") == PRESETS["h100-80gb"]
    assert load_cluster("  MI300X ") == PRESETS["mi300x"]


def test_an_unknown_preset_lists_the_presets_and_mentions_yaml_files():
    message = usage_error("b200")
    assert message.startswith(
        "'b200' is not a cluster preset (a100-40gb, a100-80gb, h100-80gb, h100-96gb-500w, h200, mi250x, mi300x"
    )
    assert "local" in message and "YAML file" in message


# --- the dataclasses ------------------------------------------------------------------------


def test_overrides_change_the_shape_and_nothing_else():
    big = load_cluster("a100-80gb", nodes=4)
    assert (big.nodes, big.devices_per_node, big.world_size) == (4, 8, 32)
    assert big.device == PRESETS["a100-80gb"].device and big.inter_node == PRESETS["a100-80gb"].inter_node
    small = big.with_overrides(devices_per_node=2)
    assert (small.nodes, small.devices_per_node) == (4, 2)
    assert big.with_overrides() == big
    with pytest.raises(UsageError, match=r"^Cluster.nodes must be a positive integer, got 0$"):
        big.with_overrides(nodes=0)


def test_figures_must_be_positive():
    with pytest.raises(UsageError, match=r"^DeviceSpec.memory_gb must be a positive number, got -1$"):
        DeviceSpec(name="x", memory_gb=-1, peak_tflops={"bf16": 1}, memory_bandwidth_gbps=1)
    with pytest.raises(UsageError, match=r"^DeviceSpec.peak_tflops has unknown precision 'int8'"):
        DeviceSpec(name="x", memory_gb=1, peak_tflops={"int8": 1}, memory_bandwidth_gbps=1)
    with pytest.raises(UsageError, match=r"^Link.bandwidth_gbps must be a positive number, got 0$"):
        Link(bandwidth_gbps=0, latency_us=1)
    with pytest.raises(UsageError, match=r"^Cluster.devices_per_node must be a positive integer, got True$"):
        PRESETS["h200"].with_overrides(devices_per_node=True)


def test_specs_are_frozen_and_keyword_only():
    device = PRESETS["h100-80gb"].device
    with pytest.raises(dataclasses.FrozenInstanceError):
        device.memory_gb = 1
    with pytest.raises(TypeError):
        device.peak_tflops["bf16"] = 1.0  # a preset cannot be changed through one of its users
    with pytest.raises(TypeError):
        Link(1.0, 2.0)
    assert hash(PRESETS["h100-80gb"]) == hash(load_cluster("h100-80gb"))


def test_peak_flops_of_a_missing_precision_names_the_ones_there():
    device = DeviceSpec(name="npu", memory_gb=16, peak_tflops={"bf16": 100}, memory_bandwidth_gbps=800)
    with pytest.raises(UsageError, match=r"^npu has no fp32 peak \(it has bf16\): add peak_tflops.fp32"):
        device.peak_flops("fp32")  # no silent fallback to tf32 or bf16
    with pytest.raises(UsageError, match=r"^precision 'fp8' is not known: use one of fp32, tf32, bf16, fp16$"):
        device.peak_flops("fp8")
    assert PRESETS["mi250x"].device.peak_tflops.keys() == {"fp32", "bf16", "fp16"}  # CDNA 2 has no TF32


# --- YAML files -----------------------------------------------------------------------------


def test_a_yaml_file_describes_a_cluster(tmp_path):
    cluster = load_cluster(str(write(tmp_path, EXAMPLE, "lab.yaml")))
    assert cluster == Cluster(
        device=DeviceSpec(
            name="a100-80gb", memory_gb=80, peak_tflops={"bf16": 312, "fp32": 19.5}, memory_bandwidth_gbps=2039
        ),
        nodes=4,
        devices_per_node=8,
        intra_node=Link(bandwidth_gbps=300, latency_us=3),
        inter_node=Link(bandwidth_gbps=25, latency_us=5),
        name="lab",  # the file's name
    )
    assert cluster.world_size == 32
    assert load_cluster(str(tmp_path / "lab.yaml"), nodes=1, devices_per_node=2).world_size == 2


def test_to_dict_round_trips_through_yaml(tmp_path):
    for name, preset in PRESETS.items():
        assert set(preset.to_dict()) == {"device", "nodes", "devices_per_node", "intra_node", "inter_node"}
        path = write(tmp_path, yaml.safe_dump(preset.to_dict()), f"{name}.yaml")
        assert load_cluster(str(path)) == preset
    assert yaml.safe_load(EXAMPLE) == load_cluster(str(write(tmp_path, EXAMPLE))).to_dict()


@pytest.mark.parametrize(
    "text, expected",
    [
        (example_with(nodes=None), f"missing field 'nodes' in cluster: {CLUSTER_FIELDS}"),
        (example_with(gpus=8), f"unknown field 'gpus' in cluster: {CLUSTER_FIELDS}"),
        (
            example_with(inter_node={"bandwidth_gbps": 25}),
            "missing field 'latency_us' in inter_node: expected fields bandwidth_gbps, latency_us",
        ),
        (
            EXAMPLE.replace("memory_gb: 80", "memory_gb: 80, vram: 80"),
            "unknown field 'vram' in device: expected fields name, memory_gb, peak_tflops, memory_bandwidth_gbps",
        ),
        (
            EXAMPLE.replace("memory_gb: 80", "memory_gb: eighty"),
            "device.memory_gb must be a positive number, got 'eighty'",
        ),
        (example_with(nodes=2.5), "nodes must be a positive integer, got 2.5"),
        (example_with(nodes="4"), "nodes must be a positive integer, got '4'"),
        (example_with(devices_per_node=-8), "devices_per_node must be a positive integer, got -8"),
        (
            example_with(inter_node={"bandwidth_gbps": -25, "latency_us": 5}),
            "inter_node.bandwidth_gbps must be a positive number, got -25",
        ),
        (
            EXAMPLE.replace("bf16: 312", "int8: 624"),
            "device.peak_tflops has unknown precision 'int8': use fp32, tf32, bf16, fp16",
        ),
        (EXAMPLE.replace("name: a100-80gb", "name: 7"), "device.name must be a non-empty string, got 7"),
        (example_with(intra_node=300), "intra_node must be a mapping with fields bandwidth_gbps, latency_us, got 300"),
        (
            "- a100-80gb\n- 4\n",
            f"cluster must be a mapping with fields {CLUSTER_FIELDS.removeprefix('expected fields ')}",
        ),
        ("", "cluster must be a mapping with fields device, nodes, devices_per_node, intra_node, inter_node, got None"),
        (EXAMPLE.replace("nodes: 4", "nodes: [4"), "invalid YAML at line "),
    ],
    ids=[
        "missing",
        "unknown",
        "missing-nested",
        "unknown-nested",
        "not-a-number",
        "fractional-count",
        "string-count",
        "negative-count",
        "negative-number",
        "unknown-precision",
        "name-not-a-string",
        "link-not-a-mapping",
        "not-a-mapping",
        "empty",
        "bad-syntax",
    ],
)
def test_a_bad_yaml_file_gets_one_line_naming_the_file_and_the_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = usage_error(str(path))
    assert message.startswith(f"{path}: {expected}")


def test_a_yaml_syntax_error_gives_the_line(tmp_path):
    path = write(tmp_path, EXAMPLE.replace("devices_per_node: 8", "devices_per_node: 8: 9"))
    assert usage_error(str(path)) == (
        f"{path}: invalid YAML at line 3 (mapping values are not allowed here): fix the syntax there"
    )


def test_a_missing_file_says_so(tmp_path):
    missing = tmp_path / "nowhere" / "cluster.yaml"
    message = usage_error(str(missing))
    assert message.startswith(f"cluster file {missing} does not exist or is not a file: check the path")
    assert usage_error(str(tmp_path)).startswith(f"cluster file {tmp_path} does not exist or is not a file")


# --- the local machine ----------------------------------------------------------------------


@pytest.fixture
def fake_measure(monkeypatch, tmp_path):
    """Replace the real measurement by a counter; the cache goes to tmp_path via ONEGPU_HOME."""
    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path))
    calls = []

    def measure(workers):
        calls.append(workers)
        link = Link(bandwidth_gbps=1.5, latency_us=50.0)
        device = DeviceSpec(name="cpu", memory_gb=8.0, peak_tflops={"fp32": 0.05}, memory_bandwidth_gbps=10.0)
        return Cluster(device=device, nodes=1, devices_per_node=workers, intra_node=link, inter_node=link, name="local")

    monkeypatch.setattr(cluster_module, "_measure", measure)
    return calls


def test_local_is_measured_once_then_read_from_the_cache(fake_measure, tmp_path):
    first = measure_local_cluster(workers=2)
    assert measure_local_cluster(workers=2) == first
    assert load_cluster("local") == first
    assert fake_measure == [2]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cluster_module._cache_path(2).name]
    measure_local_cluster(workers=2, cache=False)
    measure_local_cluster(workers=3)  # another worker count is another measurement
    assert fake_measure == [2, 2, 3]


def test_local_takes_its_worker_count_from_devices_per_node(fake_measure):
    cluster = load_cluster("local", devices_per_node=4, nodes=2)
    assert fake_measure == [4]
    assert (cluster.nodes, cluster.devices_per_node) == (2, 4)


@pytest.mark.parametrize("garbage", ["{not json", "[]", '{"key": 1}', json.dumps({"key": None, "cluster": {}})])
def test_a_corrupt_cache_is_measured_again(fake_measure, garbage):
    path = cluster_module._cache_path(2)
    path.parent.mkdir(parents=True)
    path.write_text(garbage)
    assert measure_local_cluster(workers=2).world_size == 2
    assert fake_measure == [2]
    assert measure_local_cluster(workers=2).world_size == 2  # and the cache is good again
    assert fake_measure == [2]


def test_a_cache_of_another_torch_or_host_is_not_used(fake_measure):
    measure_local_cluster(workers=2)
    path = cluster_module._cache_path(2)
    data = json.loads(path.read_text())
    data["key"]["torch"] = "0.0.1"
    path.write_text(json.dumps(data))
    measure_local_cluster(workers=2)
    assert fake_measure == [2, 2]


def test_workers_must_be_a_positive_integer(fake_measure):
    with pytest.raises(UsageError, match=r"^workers must be a positive integer, got 0$"):
        measure_local_cluster(workers=0)


@pytest.mark.slow
def test_the_local_machine_is_measured_with_real_worker_processes(monkeypatch, tmp_path):
    monkeypatch.setenv("ONEGPU_HOME", str(tmp_path))
    measured = measure_local_cluster(workers=2)
    assert (measured.name, measured.nodes, measured.devices_per_node) == ("local", 1, 2)
    assert measured.device.peak_flops("fp32") > 1e8  # even a slow core does 0.1 GFLOP/s
    assert measured.device.memory_bandwidth_gbps > 0.1
    assert measured.memory_bytes > 10**8
    assert measured.intra_node.bandwidth_gbps > 0.01
    assert 0 < measured.intra_node.latency_us < 100_000
    assert measured.inter_node == measured.intra_node
    assert list((tmp_path / "cache").glob("*.json"))

    assert measure_local_cluster(workers=2) == measured  # from the cache
    assert load_cluster("LOCAL") == measured
