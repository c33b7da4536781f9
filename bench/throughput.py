"""Tokens/s of onegpu against hand-written PyTorch, and the table of plans measured beside their prediction.

    python bench/throughput.py [--model demo|llama17m|all] [--repeats 3] [--steps 30] [--warmup 5]
    python bench/throughput.py --table [--model llama17m] [--steps 8] [--warmup 2]

Overhead (issue 14): plain PyTorch, onegpu with 1 and 2 workers, hand-written torchrun DDP (default
25 MB buckets) and FSDP2 (``fully_shard`` per decoder layer), each configuration run --repeats times,
alternating; medians, the spread (lowest-highest) and the CPU seconds per step of rank 0 (steadier
than the wall on a busy machine). Every process gets OMP_NUM_THREADS = cores / processes. Targets:
onegpu 1 worker / plain >= 1.0, onegpu 2 workers >= torchrun DDP and FSDP2.

--table: fp32, bf16 and bf16 + compile under DDP, FSDP and accumulation (2 micro-batches), each
run once as a Plan given to onegpu, with tokens/s and peak resident memory per worker, measured
and as the planner predicts them for that plan on this job's measured cluster. A plan the runtime
cannot run yet prints why.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from runs import json_result

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from onegpu.machine import cpu_cores  # noqa: E402

PY = sys.executable
PLAIN, ONE, TWO, TWO_FSDP = (
    "(a) plain PyTorch, 1 process",
    "(b) onegpu, 1 worker",
    "(c) onegpu, 2 workers",
    "(c') onegpu, 2, fsdp",
)
DDP, FSDP = "(d) torchrun DDP, 2 workers", "(e) torchrun FSDP2, 2 workers"


def configs(model: str, steps: int, warmup: int) -> dict[str, tuple[int, list[str]]]:
    """Each configuration: its processes, its command."""
    timing = ["--model", model, "--steps", str(steps), "--warmup", str(warmup)]
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    onegpu = [PY, "-m", "onegpu", "run", "--workers"]
    return {
        PLAIN: (1, [PY, "bench/baseline_plain.py", *timing, "--threads", str(cpu_cores())]),
        ONE: (1, [*onegpu, "1", "bench/onegpu_train.py", *timing]),
        TWO: (2, [*onegpu, "2", "bench/onegpu_train.py", *timing]),
        TWO_FSDP: (2, [*onegpu, "2", "bench/onegpu_train.py", *timing, "--strategy", "fsdp"]),
        DDP: (2, [*torchrun, "bench/baseline_torchrun.py", "--strategy", "ddp", *timing]),
        FSDP: (2, [*torchrun, "bench/baseline_torchrun.py", "--strategy", "fsdp", *timing]),
    }


def run(command: list[str], *, processes: int) -> dict:
    """One run, every process with an equal share of the cores as its threads (torchrun's policy, and onegpu's)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cpu_cores() // processes))}
    return json_result(command, env=env, timeout=3600)


def overhead(model: str, *, repeats: int, steps: int, warmup: int) -> None:
    runs = configs(model, steps, warmup)
    samples: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (processes, command) in runs.items():
            samples[name].append(run(command, processes=processes))
    median = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in samples.items()}
    print(f"\n{model}: tokens/s, median of {repeats} alternating runs of {steps - warmup} timed steps")
    print(f"{'configuration':32} {'tokens/s':>9} {'spread':>13} {'CPU s/step':>10}")
    for name, rs in samples.items():
        values = [r["tokens_per_s"] for r in rs]
        cpu = statistics.median(r["cpu_s_per_step"] for r in rs)
        print(f"{name:32} {median[name]:9.0f} {min(values):6.0f}-{max(values):<6.0f} {cpu:10.2f}")
    print(f"(b)/(a) = {median[ONE] / median[PLAIN]:.3f}   (target >= 1.0)")
    print(f"(c)/(d) = {median[TWO] / median[DDP]:.3f}   (c)/(e) = {median[TWO] / median[FSDP]:.3f}   (target >= 1.0)")
    print(f"(c')/(e) = {median[TWO_FSDP] / median[FSDP]:.3f}   (onegpu's FSDP against hand-written FSDP2)")


TABLE = {  # row: the plan's options for bench/onegpu_train.py
    "fp32, DDP": ["--sharding", "none", "--precision", "fp32"],
    "fp32, FSDP": ["--sharding", "parameters", "--precision", "fp32"],
    "fp32, accumulation x2": ["--sharding", "none", "--precision", "fp32", "--microbatches", "2"],
    "bf16, DDP": ["--sharding", "none", "--precision", "bf16"],
    "bf16, FSDP": ["--sharding", "parameters", "--precision", "bf16"],
    "bf16, accumulation x2": ["--sharding", "none", "--precision", "bf16", "--microbatches", "2"],
    "bf16+compile, DDP": ["--sharding", "none", "--precision", "bf16", "--compile"],
    "bf16+compile, FSDP": ["--sharding", "parameters", "--precision", "bf16", "--compile"],
    "bf16+compile, accumulation x2": ["--sharding", "none", "--precision", "bf16", "--compile", "--microbatches", "2"],
}


def table(model: str, *, steps: int, warmup: int, workers: int = 2) -> None:
    print(f"\n{model} on {workers} workers of this machine: measured / predicted (the planner's, for the same plan)")
    print(f"{'plan':30} {'tokens/s':>9} {'predicted':>9} {'peak GB/worker':>14} {'predicted':>9}")
    for row, options in TABLE.items():
        command = [PY, "-m", "onegpu", "run", "--workers", str(workers), "bench/onegpu_train.py", "--model", model]
        r = run([*command, "--steps", str(steps), "--warmup", str(warmup), "--predict", *options], processes=workers)
        if "not_executable" in r:
            print(f"{row:30} not executable yet: {r['not_executable'].split(', which')[0]}")
            continue
        print(
            f"{row:30} {r['tokens_per_s']:9.0f} {r['predicted_tokens_per_s']:9.0f} "
            f"{r['peak_bytes'] / 1e9:14.2f} {r['predicted_peak_bytes'] / 1e9:9.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo", "llama17m", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--table", action="store_true", help="the plans table instead of the overhead comparison")
    args = parser.parse_args()
    models = ["demo", "llama17m"] if args.model == "all" else [args.model]
    for model in models:
        if args.table:
            table(model, steps=args.steps, warmup=args.warmup)
        else:
            overhead(model, repeats=args.repeats, steps=args.steps, warmup=args.warmup)


if __name__ == "__main__":
    main()
