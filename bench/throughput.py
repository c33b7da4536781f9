"""Tokens/s of the demo model: plain PyTorch, onegpu with 1 and 2 workers, hand-written torchrun DDP and FSDP2.

    python bench/throughput.py [--repeats 3] [--steps 30] [--warmup 5]

Each configuration runs --repeats times, alternating, and the median is reported; run it on a
quiet machine. Targets (issue 2): onegpu 1 worker / plain >= 0.97, and onegpu 2 workers >= the
better of the torchrun scripts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from runs import json_result

PY = sys.executable


def configs(steps: int, warmup: int) -> dict[str, list[str]]:
    timing = ["--steps", str(steps), "--warmup", str(warmup)]
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    onegpu = [PY, "-m", "onegpu", "run", "--workers"]
    return {
        "(a) plain PyTorch, 1 process": [PY, "bench/baseline_plain.py", *timing],
        "(b) onegpu, 1 worker": [*onegpu, "1", "bench/onegpu_train.py", *timing],
        "(c) onegpu, 2 workers (auto)": [*onegpu, "2", "bench/onegpu_train.py", *timing],
        "(c') onegpu, 2 workers, fsdp": [*onegpu, "2", "bench/onegpu_train.py", *timing, "--strategy", "fsdp"],
        "(d) torchrun DDP, 2 workers": [*torchrun, "bench/baseline_torchrun.py", "--strategy", "ddp", *timing],
        "(d) torchrun FSDP2, 2 workers": [*torchrun, "bench/baseline_torchrun.py", "--strategy", "fsdp", *timing],
    }


def measure(command: list[str]) -> float:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1" if "torch.distributed.run" in command else os.environ.get("OMP_NUM_THREADS", ""),
    }
    env = {k: v for k, v in env.items() if v != ""}
    return json_result(command, env=env, timeout=900)["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    runs = configs(args.steps, args.warmup)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, command in runs.items():
            samples[name].append(measure(command))
    median = {name: statistics.median(values) for name, values in samples.items()}
    print(f"{'configuration':34} {'tokens/s (median)':>18}   all runs")
    for name, value in median.items():
        print(f"{name:34} {value:18.0f}   {', '.join(f'{v:.0f}' for v in samples[name])}")
    plain, one = median["(a) plain PyTorch, 1 process"], median["(b) onegpu, 1 worker"]
    two = median["(c) onegpu, 2 workers (auto)"]
    best = max(median["(d) torchrun DDP, 2 workers"], median["(d) torchrun FSDP2, 2 workers"])
    print(f"(b)/(a) = {one / plain:.3f}  (target >= 0.97)")
    print(f"(c)/best(d) = {two / best:.3f}  (target >= 1.00)")


if __name__ == "__main__":
    main()
