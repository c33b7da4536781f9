"""Predicted vs measured step time and peak memory on this machine, for plans the runtime executes.

    python bench/local_accuracy.py [--large]

Runs bench/local_step.py for 2 and 4 workers, DDP and FSDP, with and without activation
checkpointing, and prints the planner's prediction beside the measurement (peak memory is each
worker's peak resident set, the largest over workers).
"""

from __future__ import annotations

import argparse
import sys

from runs import json_result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", action="store_true")
    args = parser.parse_args()
    print(
        f"{'workers':>7}  {'plan':46} {'step s meas':>11} {'pred':>7} {'ratio':>6} {'peak GB meas':>12} {'pred':>6} {'ratio':>6}"
    )
    for workers in (2, 4):
        for sharding in ("none", "parameters"):
            for checkpointing in ("none", "selective", "full"):
                command = [
                    sys.executable,
                    "-m",
                    "onegpu",
                    "run",
                    "--workers",
                    str(workers),
                    "bench/local_step.py",
                    "--sharding",
                    sharding,
                    "--checkpointing",
                    checkpointing,
                    *(["--large"] if args.large else []),
                ]
                try:
                    r = json_result(command)
                except SystemExit as failure:
                    print(f"{workers:>7}  {sharding}/{checkpointing} failed: {str(failure).strip().splitlines()[-1]}")
                    continue
                print(
                    f"{workers:>7}  {r['plan']:46} {r['measured_step_s']:11.3f} {r['predicted_step_s']:7.3f} "
                    f"{r['predicted_step_s'] / r['measured_step_s']:6.2f} {r['measured_peak_bytes'] / 1e9:12.2f} "
                    f"{r['predicted_peak_bytes'] / 1e9:6.2f} {r['predicted_peak_bytes'] / r['measured_peak_bytes']:6.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
