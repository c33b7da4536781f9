"""How long planning takes, from model to chosen plan, up to 1T parameters and 4096 devices.

    python bench/plan_speed.py

The first analysis in a process also imports transformers' model code; that one-time cost is
reported separately.
"""

from __future__ import annotations

import time

from onegpu.planner.analysis import analyze
from onegpu.planner.cluster import load_cluster
from onegpu.planner.search import find_plan

CASES = [
    ("gpt2", 1024, 64, "a100-80gb", 1),
    ("llama3-8b", 4096, 64, "h100-80gb", 2),
    ("llama3-70b", 4096, 512, "h100-80gb", 64),
    ("llama3-405b", 8192, 2048, "h100-80gb", 512),
    ("llama-1t", 2048, 4096, "a100-80gb", 512),
]


def main() -> None:
    started = time.perf_counter()
    analyze("gpt2", seq_len=8)
    print(f"one-time import of transformers model code: {time.perf_counter() - started:.2f} s")
    print(f"{'model':12} {'devices':>7} {'total s':>8} {'analysis s':>10} {'search s':>9} {'candidates':>10}  plan")
    for model, seq, batch, gpu, nodes in CASES:
        cluster = load_cluster(gpu, nodes=nodes)
        start = time.perf_counter()
        chosen = find_plan(model, global_batch_size=batch, seq_len=seq, cluster=cluster)
        total = time.perf_counter() - start
        start = time.perf_counter()
        analyze(model, seq_len=seq, precision="bf16")
        analyze(model, seq_len=seq, precision="fp32")
        analysis = time.perf_counter() - start
        print(
            f"{model:12} {cluster.world_size:7} {total:8.2f} {analysis:10.2f} {total - analysis:9.2f} "
            f"{chosen.search.candidates:10}  {chosen.describe()}"
        )


if __name__ == "__main__":
    main()
