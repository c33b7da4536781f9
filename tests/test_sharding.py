"""When the model does not fit one worker, onegpu shards it, and a meta-built model is never whole anywhere."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_onegpu


@pytest.mark.slow
def test_meta_model_over_budget_is_sharded_and_trains(tmp_path):
    out = tmp_path / "report.json"
    result = run_onegpu("run", "--workers", "2", "tests/scripts/meta_fsdp.py", str(out))
    assert result.returncode == 0, result.stderr
    assert "strategy: fsdp" in result.stderr and "exceeds" in result.stderr
    workers = json.loads(out.read_text())
    for report in workers:
        assert report["strategy"] == "fsdp"
        assert report["local"] <= math.ceil(report["total"] / 2) + 4096  # only its shard (rows round up)
        assert report["rope_ok"]
        assert all(math.isfinite(loss) for loss in report["losses"])
        assert report["losses"][-1] < report["losses"][0]
    assert workers[0]["losses"] == workers[1]["losses"]  # the global loss, the same on every worker
