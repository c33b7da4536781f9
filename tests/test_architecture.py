"""The architecture holds: the Plan is the whole contract between planner and runtime, and the packages
depend on each other in one direction only."""

from __future__ import annotations

import ast
import json

import pytest
import torch
from conftest import ROOT, assert_same_training, run_onegpu
from scenarios import build, train
from test_single_device_equivalence import load_checkpoint

from onegpu.plan import Plan
from onegpu.planner.inspection import describe
from onegpu.planner.layout import fit_layout

# which top-level parts may use which: each only those below it
LAYERS = [
    {"errors"},
    {"settings", "machine", "batches", "outputs", "plan"},
    {"pool", "parallel"},
    {"launch", "planner"},
    {"runtime", "report"},
    {"api"},
    {"integrations"},
    {"cli", "onegpu"},
    {"__main__"},
]


def imports_between_parts() -> set[tuple[str, str]]:
    """(importer, imported) top-level parts of onegpu, from every import statement (lazy ones too)."""
    part = lambda module: module.split(".")[1] if module.count(".") else "onegpu"  # noqa: E731
    edges = set()
    for path in (ROOT / "onegpu").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            edges |= {(part(module), part(n)) for n in names if n.split(".")[0] == "onegpu" and part(n) != part(module)}
    return edges


def test_parts_depend_downward_only():
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    upward = sorted((a, b) for a, b in imports_between_parts() if level[b] >= level[a])
    assert upward == [], "imports against the layering (or a part missing from LAYERS)"


def test_the_runtime_reads_the_plan_not_the_planner():
    assert not {b for a, b in imports_between_parts() if a in ("runtime", "parallel")} & {"planner", "api", "report"}


@pytest.fixture(scope="module")
def plans_from_json(tmp_path_factory):
    """Plans for Llama on 4 workers, made and fitted here, executed by the workers from their JSON alone."""
    model, data = build("hf")
    ids = data[0]["input_ids"][None]
    description = describe(model, sample={"input_ids": ids, "labels": ids}, seq_len=ids.shape[1])
    plans = {
        "ddp": Plan(dp=4),
        "zero2": Plan(dp=4, sharding="gradients"),
        "fsdp-checkpointed": Plan(dp=4, sharding="parameters", activation_checkpointing="full"),
        "tp2-dp2": Plan(dp=2, tp=2),
        "pp2-dp2": Plan(dp=2, pp=2, microbatches=1, schedule="gpipe"),
        "tp2-pp2": Plan(dp=1, tp=2, pp=2, microbatches=5, schedule="1f1b"),
    }
    out = tmp_path_factory.mktemp("from-json")
    texts = {name: fit_layout(plan, description).to_json() for name, plan in plans.items()}
    (out / "plans.json").write_text(json.dumps(texts))
    result = run_onegpu(
        "run", "--workers", "4", "tests/scripts/train_from_json.py", str(out), str(out / "plans.json"), timeout=600
    )
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "results.json").read_text()), texts


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "zero2", "fsdp-checkpointed", "tp2-dp2", "pp2-dp2", "tp2-pp2"])
def test_the_runtime_builds_every_layout_from_a_serialised_plan_alone(plans_from_json, name):
    out, results, texts = plans_from_json
    assert Plan.from_json(texts[name]).to_json() == texts[name]  # what was sent is what was run
    assert_same_training(results[name], train("hf"), trained=load_checkpoint("hf", out / name))


def test_a_plan_fitted_to_another_model_is_refused_before_anything_changes():
    import onegpu
    from onegpu.errors import UsageError
    from onegpu.plan import StageLayout

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    alien = Plan(dp=1, blocks="model.layers", stages=None)
    with pytest.raises(UsageError, match=r"^the plan was made for another model \(its blocks at 'model.layers'"):
        onegpu.prepare(model, plan=alien)
    assert StageLayout(cuts=(1,)).stages == 2
