"""A model whose DDP plan exceeds the per-worker memory budget trains under Advanced Parallelization.

    python bench/ap_memory.py [--budget-gb 1.25]

Trains a 23M-parameter Llama on 2 CPU workers with onegpu.enable_advanced_parallelization() and
a per-worker budget that replicating the model (DDP) would exceed, then prints the plan chosen,
why DDP lost, and every worker's measured peak resident memory against the budget.
"""

from __future__ import annotations

import argparse
import sys

from runs import json_result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-gb", type=float, default=1.25, help="GiB per worker")
    args = parser.parse_args()
    command = [
        sys.executable,
        "-m",
        "onegpu",
        "run",
        "--workers",
        "2",
        "bench/local_step.py",
        "--large",
        "--advanced",
        "--budget-gb",
        str(args.budget_gb),
        "--steps",
        "8",
        "--warmup",
        "2",
    ]
    r = json_result(command)
    print(f"budget per worker:      {args.budget_gb:.2f} GiB = {args.budget_gb * 2**30 / 1e9:.2f} GB")
    print(f"plan chosen:            {r['plan']}")
    for other in r["others"]:
        print(f"  lost: {other}")
    print(
        f"predicted peak:         {r['predicted_peak_bytes'] / 1e9:.2f} GB per worker: "
        + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in r["breakdown"].items())
    )
    print(
        f"measured peak (max RSS): {r['measured_peak_bytes'] / 1e9:.2f} GB per worker "
        f"({'inside' if r['measured_peak_bytes'] <= args.budget_gb * 2**30 else 'OVER'} the budget)"
    )
    print(
        f"loss: {r['losses'][0]:.3f} -> {r['losses'][1]:.3f}; step {r['measured_step_s']:.2f} s "
        f"(predicted {r['predicted_step_s']:.2f} s)"
    )


if __name__ == "__main__":
    main()
