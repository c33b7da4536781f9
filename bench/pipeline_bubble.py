"""Measured pipeline step time against the ideal and the planner, for the demo model on 2 CPU workers.

    python bench/pipeline_bubble.py

For each schedule and micro-batch count: the step time of a 2-worker pipeline; the ideal, one
single-threaded worker's step time / 2 (each pipeline worker gets one of the 2 cores); the
measured bubble fraction 1 - ideal / measured; the schedule's theoretical bubble, b / (m + b)
with b = p - 1 idle micro-batch slots (/ 2 when interleaved over 2 stages per worker, / 3 more
for zero-bubble); and the planner's predicted step time. The demo model has 4 blocks: the
interleaved schedules run 1 block per stage.
"""

from __future__ import annotations

import sys

from runs import ROOT, json_result

STEP = ROOT / "bench" / "pipeline_step.py"
SLOTS = {"gpipe": 1.0, "1f1b": 1.0, "interleaved": 0.5, "zero-bubble": 0.5 / 3}  # idle slots per pipeline worker


def run(workers: int, *args: str) -> dict:
    command = [sys.executable, "-m", "onegpu", "run", "--workers", str(workers), str(STEP), *args]
    return json_result(command, timeout=900)


def main() -> None:
    single = run(1, "--threads", "1")["step_s"]
    print(f"one worker, one thread: {single:.3f} s/step; ideal 2-worker pipeline: {single / 2:.3f} s/step")
    print(f"{'schedule':12} {'micro-batches':>13} {'step s':>7} {'bubble':>7} {'theory':>7} {'predicted s':>11}")
    for schedule in SLOTS:
        for micro in (2, 4, 8):
            result = run(2, "--schedule", schedule, "--microbatches", str(micro))
            step, slots = result["step_s"], SLOTS[schedule]
            print(
                f"{schedule:12} {micro:13} {step:7.3f} {1 - single / 2 / step:7.1%} {slots / (micro + slots):7.1%} "
                f"{result['predicted_s']:11.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
