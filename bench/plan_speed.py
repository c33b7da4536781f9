"""How long planning takes, from model to chosen plan, up to 1T parameters and 4096 devices, and how long the
cold ``onegpu plan`` command takes (a new process: imports, analysis, search, output).

    python bench/plan_speed.py          # the cases below, and the cold command
    python bench/plan_speed.py --all    # also every preset model on 4096 devices of every cluster preset

Targets (issue 17): search under 2 s, the cold command under 4 s of wall time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from onegpu.planner.analysis import describe_model
from onegpu.planner.cluster import PRESETS as CLUSTERS
from onegpu.planner.cluster import load_cluster
from onegpu.planner.model_presets import PRESETS as MODELS
from onegpu.planner.search import find_plan

SEARCH_TARGET_S, COMMAND_TARGET_S = 2.0, 4.0
CASES = [
    ("gpt2", 1024, 64, "a100-80gb", 1),
    ("llama3-8b", 4096, 64, "h100-80gb", 2),
    ("llama3-70b", 4096, 512, "h100-80gb", 64),
    ("llama3-405b", 8192, 2048, "h100-80gb", 512),
    ("llama-1t", 2048, 4096, "a100-80gb", 512),
]
COMMAND = ["plan", "--model", "llama3-8b", "--cluster", "h100-80gb", "--nodes", "2"]
COMMAND += ["--global-batch-size", "64", "--seq-len", "8192"]


def search_seconds(model: str, seq: int, batch: int, gpu: str, nodes: int) -> tuple[float, float, object]:
    """Analysis time, search time (of the models already described) and the chosen plan."""
    cluster = load_cluster(gpu, nodes=nodes)
    start = time.perf_counter()
    described = {p: describe_model(model, seq_len=seq, precision=p) for p in ("fp32", "bf16")}
    analysis = time.perf_counter() - start
    start = time.perf_counter()
    chosen = find_plan(described, global_batch_size=batch, seq_len=seq, cluster=cluster)
    return analysis, time.perf_counter() - start, chosen


def cold_command_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onegpu", *COMMAND], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every preset model on 4096 devices of every cluster")
    args = parser.parse_args()
    print(f"cold `onegpu {' '.join(COMMAND)}`: {cold_command_seconds():.2f} s wall (target < {COMMAND_TARGET_S:g} s)")
    print(f"{'model':12} {'devices':>7} {'analysis s':>10} {'search s':>9} {'target':>6} {'candidates':>10}  plan")
    cases = CASES + ([(m, 2048, 4096, c, 512) for m in MODELS for c in CLUSTERS] if args.all else [])
    worst = 0.0
    for model, seq, batch, gpu, nodes in cases:
        try:
            analysis, search, chosen = search_seconds(model, seq, batch, gpu, nodes)
        except Exception as error:  # noqa: BLE001 - a model that fits no plan on this cluster: report and go on
            print(f"{model:12} {gpu:>10}: {error}")
            continue
        worst = max(worst, search)
        print(
            f"{model:12} {nodes * 8:7} {analysis:10.2f} {search:9.2f} {'< ' + format(SEARCH_TARGET_S, 'g'):>6} "
            f"{chosen.search.candidates:10}  {gpu}: {chosen.describe()}"
        )
    print(f"slowest search: {worst:.2f} s (target < {SEARCH_TARGET_S:g} s)")


if __name__ == "__main__":
    main()
