"""`onegpu plan --plot FILE`: memory per device and step time by component of the chosen plan and its runners-up,
as PNG or SVG; a wrong suffix is one line, exit code 2, and no file."""

import json

import pytest
from typer.testing import CliRunner

from onegpu.cli import app
from onegpu.plan import Plan
from onegpu.report.plan_plot import compared, plot_plan, short_name

PRESET = ["plan", "--model", "llama3-8b", "--cluster", "h100-80gb", "--nodes", "2"]
PRESET += ["--global-batch-size", "64", "--seq-len", "4096"]


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_short_names_say_the_layout_in_a_few_words():
    assert short_name(Plan(dp=4, sharding="gradients")) == "dp4 zero2"
    assert short_name(Plan(dp=2, tp=2, pp=2, schedule="1f1b", microbatches=8)) == "dp2 tp2 pp2 1f1b×8"
    hybrid = Plan(dp=8, sharding="hybrid", shard_group=4, activation_checkpointing="selective", precision="bf16")
    assert short_name(hybrid) == "dp8 hsdp/4 sac bf16"
    assert short_name(Plan(dp=1, microbatches=4, offload="optimizer")) == "dp1 acc4 offload-opt"


def test_a_preset_plan_draws_as_png_and_svg(tmp_path):
    svg, png = tmp_path / "plans.svg", tmp_path / "plans.png"
    result = run(*PRESET, "--plot", str(svg), "--json")
    assert result.exit_code == 0, result.output
    chosen = Plan.from_dict(json.loads(result.stdout)["plan"])
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "</svg>" in text
    assert f"{short_name(chosen)}  [chosen]" in text  # the plans' names are text in the SVG, not only glyphs
    assert "memory per device, by category (GB)" in text and "step time, by component (s)" in text
    assert "budget 72.0 GB" in text  # 0.9 of an H100's 80 GB
    assert "activations" in text and "data_parallel_comm" in text  # the categories' legends
    assert run(*PRESET, "--plot", str(png)).exit_code == 0
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 20_000


def test_a_hand_written_model_draws_in_its_own_units(tmp_path):
    """A plain nn.Module of a few thousand parameters: megabytes and milliseconds, not GB and seconds."""
    import torch
    from scenarios import SkipNet

    from onegpu.planner.inspection import describe
    from onegpu.planner.search import find_plan

    sample = (torch.randn(1, 8), torch.randn(1, 1))
    description = describe(SkipNet(depth=4), sample=sample, seq_len=1)
    chosen = find_plan(description, global_batch_size=16, seq_len=1, cluster="a100-40gb", pp=2)
    text = plot_plan(chosen, tmp_path / "skipnet.svg", budget_bytes=36e9).read_text()
    assert f"{short_name(chosen)}  [chosen]" in text and "pipeline_bubble" in text
    assert "step time, by component (ms)" in text and "(+" in text  # each runner-up: how much slower


def test_every_drawn_plan_has_a_distinct_name():
    from onegpu.planner.search import find_plan

    chosen = find_plan("gpt2", global_batch_size=32, seq_len=1024, cluster="a100-80gb")
    rows = compared(chosen)
    assert rows[0] == (f"{short_name(chosen)}  [chosen]", chosen)
    assert len(rows) > 3 and len({label for label, _ in rows}) == len(rows)


@pytest.mark.parametrize("name", ["plans.pdf", "plans", "missing/plans.svg"])
def test_a_wrong_file_is_one_line_and_writes_nothing(tmp_path, name):
    result = run(*PRESET, "--plot", str(tmp_path / name))
    assert result.exit_code == 2
    assert result.stderr.startswith("onegpu: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Plan:" not in result.stdout  # refused before planning
    assert list(tmp_path.rglob("*")) == []
