"""Measured pipeline step time against the ideal, for the demo model on 2 CPU workers.

    python bench/pipeline_bubble.py

For each schedule and micro-batch count: the step time of a 2-stage pipeline, the ideal (one
worker's step time / 2), the measured bubble fraction 1 - ideal / measured, and the schedule's
theoretical bubble (p-1)/(m+p-1). CPU workers share 2 cores, so communication is not free here.
"""

from __future__ import annotations

import sys

from runs import ROOT, json_result

STEP = ROOT / "bench" / "pipeline_step.py"


def run(workers: int, *args: str) -> float:
    command = [sys.executable, "-m", "onegpu", "run", "--workers", str(workers), str(STEP), *args]
    return json_result(command, timeout=900)["step_s"]


def main() -> None:
    single = run(1)
    print(f"one worker: {single:.3f} s/step; ideal 2-stage pipeline: {single / 2:.3f} s/step")
    print(f"{'schedule':8} {'micro-batches':>13} {'step s':>7} {'bubble':>7} {'theory':>7}")
    for schedule in ("gpipe", "1f1b"):
        for micro in (2, 4, 8):
            step = run(2, "--schedule", schedule, "--microbatches", str(micro))
            print(
                f"{schedule:8} {micro:13} {step:7.3f} {1 - single / 2 / step:7.1%} {1 / (micro + 1):7.1%}", flush=True
            )


if __name__ == "__main__":
    main()
