"""`onegpu plan`: a table or JSON for a cluster you do not have, and one-line errors for bad input."""

import json

import pytest
from typer.testing import CliRunner

from onegpu.cli import app

pytestmark = pytest.mark.slow  # the real CLI, in processes of its own

BASE = ["plan", "--model", "gpt2", "--global-batch-size", "32", "--seq-len", "1024"]


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_json_has_the_documented_shape():
    result = run(*BASE, "--cluster", "a100-80gb", "--nodes", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"plan", "predicted", "alternatives", "search", "confidence"}
    assert any("across nodes" in note and "datasheet" in note for note in data["confidence"])
    assert data["plan"]["dp"] * data["plan"]["tp"] * data["plan"]["pp"] == 16


def test_the_table_explains_the_choice():
    result = run(*BASE, "--cluster", "h100-80gb", "--tp", "2")
    assert result.exit_code == 0, result.output
    assert "Plan: dp=4, tp=2" in result.stdout
    assert "candidates considered" in result.stdout and "slower" in result.stdout
    assert "unmeasured: H100 SXM5 80GB: peak 989.5 TFLOP/s (bf16)" in result.stdout


def test_a_yaml_cluster_with_overrides(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text(
        "device: {name: a100-80gb, memory_gb: 80, peak_tflops: {bf16: 312, fp32: 19.5}, memory_bandwidth_gbps: 2039}\n"
        "nodes: 4\ndevices_per_node: 8\n"
        "intra_node: {bandwidth_gbps: 300, latency_us: 3}\ninter_node: {bandwidth_gbps: 25, latency_us: 5}\n"
    )
    result = run(*BASE, "--cluster", str(path), "--devices-per-node", "4", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert plan["dp"] * plan["tp"] * plan["pp"] == 16


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["--cluster", "h900"], "onegpu: 'h900' is not a cluster preset (a100-40gb"),
        (["--cluster", "a100-80gb", "--tp", "3"], "onegpu: tp=3 must divide the 8 devices of a node"),
        (["--cluster", "a100-80gb", "--schedule", "zigzag"], "onegpu: schedule='zigzag' is not known"),
        (
            ["--cluster", "a100-80gb", "--dp", "8", "--global-batch-size", "12"],
            "onegpu: global batch size 12 cannot be split",
        ),
    ],
)
def test_bad_input_is_one_line(args, start):
    argv = list(BASE)
    if "--global-batch-size" in args:
        index = argv.index("--global-batch-size")
        del argv[index : index + 2]
    result = run(*argv, *args)
    assert result.exit_code == 1
    assert result.stderr.startswith(start), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("device: {name: x\nnodes: [\n")
    result = run(*BASE, "--cluster", str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"onegpu: {path}") and len(result.stderr.strip().splitlines()) == 1


def test_unknown_model_is_one_line():
    result = run("plan", "--model", "llama9", "--global-batch-size", "8", "--seq-len", "8", "--cluster", "a100-80gb")
    assert result.exit_code == 1 and "neither a preset" in result.stderr
