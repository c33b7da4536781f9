"""The search's shortcuts change nothing: it picks what scoring every candidate at every checkpointing level
picks, its stage cuts are the exhaustive ones, and the presets' stored descriptions are the inspection's."""

import json
import random
import subprocess
import sys
from dataclasses import replace

import pytest

from onegpu.planner import preset_profiles
from onegpu.planner.analysis import describe_live, describe_model
from onegpu.planner.cluster import load_cluster
from onegpu.planner.cost_model import Workload, memory, predict
from onegpu.planner.inspection import ModelDescription
from onegpu.planner.pins import parse_pins
from onegpu.planner.search import DEFAULT_BUDGET_FRACTION, _Search, find_plan
from onegpu.planner.stages import balanced_cuts, worker_stage_blocks
from tests.test_planner_search import cluster, transformer


def exhaustive_best(described: dict, *, batch: int, cluster) -> float:
    """The lowest predicted step time of any plan that fits, every candidate scored at every checkpointing level."""
    budget = int(cluster.memory_bytes * DEFAULT_BUDGET_FRACTION)
    search = _Search(described, batch, 2, cluster, parse_pins(), budget)
    best = float("inf")
    for precision, description in described.items():
        work = Workload(
            profile=description.profile, global_batch=batch, sequence_parallel=description.sequence_parallel
        )
        for base in search.candidates(precision):
            stages = worker_stage_blocks(work.profile, pp=base.pp, schedule=base.schedule)
            for count in ["none", "full", *range(1, max(max(s) for s in stages))]:
                plan = replace(base, activation_checkpointing=count)
                if sum(memory(plan, work, cluster).values()) <= budget:
                    best = min(best, predict(plan, work, cluster).step_time_s)
    return best


CASES = {
    "gpt2 on a node of A100": ("gpt2", 1024, 64, load_cluster("a100-80gb", nodes=1)),
    "llama3-8b on one node, checkpointing needed": ("llama3-8b", 8192, 16, load_cluster("a100-40gb", nodes=1)),
    "a 16-block profile on 32 small devices": (
        transformer(layers=16, hidden=5120),
        2048,
        128,
        cluster(nodes=4, per_node=8, memory_gb=16),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_search_picks_what_scoring_every_candidate_picks(case):
    model, seq, batch, where = case
    if isinstance(model, str):
        described = {p: describe_model(model, seq_len=seq, precision=p) for p in ("fp32", "bf16")}
    else:
        described = {"bf16": ModelDescription.of_profile(model)}
    chosen = find_plan(described, global_batch_size=batch, seq_len=seq, cluster=where)
    assert chosen.predicted.step_time_s == exhaustive_best(described, batch=batch, cluster=where)


def slow_balanced_cuts(costs, *, stages, first_extra=0.0, last_extra=0.0):
    """The specification: every last-stage start tried, the first of the lowest kept."""
    blocks, prefix = len(costs), [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    best = [[inf] * (blocks + 1) for _ in range(stages + 1)]
    choice = [[0] * (blocks + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, blocks + 1):
            for j in range(s - 1, i):
                stage = prefix[i] - prefix[j] + (first_extra if j == 0 else 0.0) + (last_extra if i == blocks else 0.0)
                if max(best[s - 1][j], stage) < best[s][i]:
                    best[s][i], choice[s][i] = max(best[s - 1][j], stage), j
    cuts, end = [], blocks
    for s in range(stages, 1, -1):
        end = choice[s][end]
        cuts.append(end)
    return sorted(cuts)


def test_stage_cuts_are_the_exhaustive_ones_ties_and_empty_blocks_included():
    rng = random.Random(17)
    for trial in range(400):
        n = rng.randint(2, 24)
        pick = [lambda: rng.random(), lambda: float(rng.choice([0, 1, 2])), lambda: 1.0, lambda: rng.choice([0.0, 3.3])]
        costs = [pick[trial % 4]() for _ in range(n)]
        stages, first, last = rng.randint(2, n), rng.choice([0.0, 0.5, 5.0]), rng.choice([0.0, 0.7, 7.0])
        expected = slow_balanced_cuts(costs, stages=stages, first_extra=first, last_extra=last)
        assert balanced_cuts(costs, stages=stages, first_extra=first, last_extra=last) == expected


UNSEEN = {"gpt2": 1000, "gpt2-xl": 77, "llama2-13b": 4096, "llama3-8b": 8192}  # lengths it was not fitted at


@pytest.mark.parametrize("name", sorted(preset_profiles.PRESETS))
def test_a_presets_stored_description_is_the_inspections_at_a_length_it_was_not_fitted_at(name):
    seq, precision = UNSEEN.get(name, 2048), "fp32" if name.startswith("gpt2") else "bf16"
    stored = preset_profiles.preset_description(name, seq_len=seq, precision=precision)
    assert stored is not None, "regenerate: python -m onegpu.planner.preset_profiles --write"
    assert stored == describe_live(name, seq_len=seq, precision=precision)


def test_a_preset_whose_config_changed_is_inspected_live(monkeypatch):
    changed = {**preset_profiles.PRESETS["gpt2"], "n_layer": 3}
    monkeypatch.setitem(preset_profiles.PRESETS, "gpt2", changed)
    assert preset_profiles.preset_description("gpt2", seq_len=64, precision="fp32") is None
    assert describe_model("gpt2", seq_len=64).block_count == 3


def test_planning_a_preset_does_not_import_transformers():
    code = (
        "import sys; from onegpu.planner.search import find_plan; "
        "find_plan('llama3-8b', global_batch_size=64, seq_len=8192, cluster='h100-80gb'); "
        "print(sorted(m for m in sys.modules if m.startswith('transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_the_stored_preset_descriptions_are_what_the_writer_writes():
    stored = json.loads(preset_profiles.DATA_PATH.read_text())
    fresh = preset_profiles.generate(["gpt2"])  # one preset: each takes a dozen inspections
    assert fresh["part_fields"] == stored["part_fields"]
    assert fresh["models"]["gpt2"] == stored["models"]["gpt2"], (
        "regenerate: python -m onegpu.planner.preset_profiles --write"
    )
