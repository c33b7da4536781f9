"""Tensor parallelism against data parallelism and FSDP on 2 CPU workers: step time and memory per worker.

    python bench/tensor_parallel.py [--large]

Runs bench/local_step.py three ways on the same model and global batch: tp=2, dp=2 (DDP) and
dp=2 with FSDP, and prints each measured step time and peak resident memory (the largest over
the workers; it includes the ~0.4 GB every Python process with torch and transformers holds)
beside the planner's prediction for the same plan.
"""

from __future__ import annotations

import argparse
import sys

from runs import json_result

WAYS = {"tp=2": ["--tp", "2"], "dp=2 (DDP)": [], "dp=2 (FSDP)": ["--sharding", "parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", action="store_true")
    args = parser.parse_args()
    print(f"{'plan':12} {'step s meas':>11} {'pred':>7} {'ratio':>6} {'peak GB meas':>12} {'pred':>6} {'ratio':>6}")
    for name, extra in WAYS.items():
        command = [sys.executable, "-m", "onegpu", "run", "--workers", "2", "bench/local_step.py", *extra]
        r = json_result(command + (["--large"] if args.large else []))
        step, peak = r["measured_step_s"], r["measured_peak_bytes"]
        print(
            f"{name:12} {step:11.3f} {r['predicted_step_s']:7.3f} {r['predicted_step_s'] / step:6.2f} "
            f"{peak / 1e9:12.2f} {r['predicted_peak_bytes'] / 1e9:6.2f} {r['predicted_peak_bytes'] / peak:6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
