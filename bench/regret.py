"""Regret of Advanced Parallelization on this machine: does the plan it picks run fastest?

    python bench/regret.py [--models demo,llama17m,llama60m] [--budgets none,tight] [--rounds 2] [--steps 6]
        [--warmup 3] [--trials K] [--out FILE]
    python bench/regret.py --repredict FILE

For each model, on 2 workers, without a memory budget and with a tight one (the chosen plan's predicted memory
beyond the runtime's, times ``--tight``, 0.5: it forces sharding or checkpointing), the planner's chosen plan and its alternatives
(up to 5 plans of distinct families) each run as their own job (bench/regret_step.py). The plans run in
``rounds`` interleaved rounds (the order rotates) so that load from other processes falls on all of them; a plan's
step time is the median of all its timed steps, its memory the largest worker's peak resident set. Prints, per
plan, predicted vs measured step time and memory, the measured fastest, and the regret of the chosen plan
(its measured time over the fastest's, minus 1), with the load average while it ran. "cpu s" is rank 0's CPU
seconds per step: on a machine busy with other work, a steadier figure than the wall's. ``--out`` keeps the raw
figures as JSON. ``--repredict FILE`` prints those measurements again beside today's cost model's predictions for the
same plans (before/after a change of the model). ``--trials K`` also plans each case with
``enable_advanced_parallelization(trials=K)`` and prints the regret of the plan those trials kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from runs import json_result

from onegpu.plan import Plan

LAUNCH = [sys.executable, "-m", "onegpu", "run", "--workers", "2", "bench/regret_step.py"]


def plans_for(model: str, budget_gb: float | None, *, trials: int | None = None) -> list[dict]:
    budget = [] if budget_gb is None else ["--budget-gb", f"{budget_gb:.3f}"]
    measure = [] if trials is None else ["--trials", str(trials)]
    return json_result([*LAUNCH, "--model", model, *budget, "--list", *measure])["plans"]


def trials_regret(model: str, budget_gb: float | None, result: dict, *, trials: int) -> None:
    """Plan the case again with ``trials``; the regret of the plan they kept, against this bench's measurements."""
    kept = Plan.from_json(plans_for(model, budget_gb, trials=trials)[0]["plan"])
    listed = [Plan.from_json(p["plan"]) for p in result["plans"]]
    index = next((i for i, p in enumerate(listed) if p.describe() == kept.describe()), None)
    rows = result["rows"]
    if index is None or rows[index] is None:
        print(f"  trials={trials} kept {kept.describe()}: not among the measured plans")
        return
    fastest = rows[result["fastest"]]["measured_s"]
    result["trials_regret"] = rows[index]["measured_s"] / fastest - 1
    print(f"  trials={trials} kept #{index + 1} ({kept.describe()}): regret {result['trials_regret']:.1%}")


def tight_budget(chosen: dict, fraction: float) -> float:
    """``fraction`` of what the unbudgeted choice needs beyond the runtime itself, in GiB (memory_budget_gb's unit)."""
    predicted = chosen["predicted"]
    runtime = predicted["memory_breakdown"]["runtime"]
    return (runtime + (predicted["memory_per_device_bytes"] - runtime) * fraction) / 2**30


def measure(model: str, plans: list[dict], *, rounds: int, steps: int, warmup: int) -> list[dict]:
    """Every plan's step times (pooled over the rounds) and peak memory; the order rotates each round."""
    runs: list[dict] = [{"steps": [], "cpu": [], "peaks": []} for _ in plans]
    for r in range(rounds):
        for i in [(r + k) % len(plans) for k in range(len(plans))]:
            command = [*LAUNCH, "--model", model, "--plan", plans[i]["plan"], "--steps", str(steps)]
            try:
                result = json_result([*command, "--warmup", str(warmup)])
            except SystemExit as failure:
                runs[i]["failed"] = str(failure).strip().splitlines()[-1]
                continue
            runs[i]["describe"] = result["plan"]
            runs[i]["steps"] += result["step_s"]
            runs[i]["cpu"] += result["cpu_s"]
            runs[i]["peaks"].append(result["peak_bytes"])
    return runs


def report(model: str, budget_gb: float | None, plans: list[dict], runs: list[dict], load: tuple) -> dict:
    print(f"\n{model}, {'no budget' if budget_gb is None else f'budget {budget_gb:.2f} GiB'} | load {load}")
    print(
        f"  {'plan':58} {'pred s':>7} {'meas s':>7} {'ratio':>6} {'cpu s':>6} {'pred GB':>7} {'meas GB':>7} {'ratio':>6}"
    )
    rows = []
    for k, (plan, run) in enumerate(zip(plans, runs)):
        p = plan["predicted"]
        if not run["steps"]:
            print(f"  {'*' if k == 0 else ' '}{run.get('failed', 'no measurement')}")
            rows.append(None)
            continue
        measured, peak = statistics.median(run["steps"]), max(run["peaks"])
        rows.append({"measured_s": measured, "peak_bytes": peak, "cpu_share": sum(run["cpu"]) / sum(run["steps"])})
        print(
            f"  {'*' if k == 0 else ' '}{run['describe'][:57]:57} {p['step_time_s']:7.3f} {measured:7.3f} "
            f"{p['step_time_s'] / measured:6.2f} {statistics.median(run['cpu']):6.2f} "
            f"{p['memory_per_device_bytes'] / 1e9:7.2f} {peak / 1e9:7.2f} "
            f"{p['memory_per_device_bytes'] / peak:6.2f}"
        )
    measured = [r["measured_s"] if r else float("inf") for r in rows]
    fastest = min(range(len(rows)), key=measured.__getitem__)
    regret = measured[0] / measured[fastest] - 1
    print(f"  measured fastest: #{fastest + 1} | regret of the chosen plan (*): {regret:.1%}")
    return {"model": model, "budget_gb": budget_gb, "plans": plans, "runs": runs, "rows": rows, "regret": regret,
            "fastest": fastest, "load": load}  # fmt: skip


def repredict(path: str) -> None:
    """The measurements kept in ``path`` beside the predictions the cost model makes now for the same plans."""
    import tempfile

    for result in json.load(open(path)):
        plans = result["plans"]
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as listed:
            json.dump([p["plan"] for p in plans], listed)
        now = json_result([*LAUNCH, "--model", result["model"], "--predict", listed.name])["predicted"]
        print(f"\n{result['model']}, budget {result['budget_gb']}: measured | predicted before -> now")
        for plan, run, after in zip(plans, result["runs"], now):
            if not run["steps"]:
                continue
            measured, peak = statistics.median(run["steps"]), max(run["peaks"])
            before = plan["predicted"]
            print(
                f"  {run['describe'][:50]:50} {measured:7.3f} s | {before['step_time_s'] / measured:5.2f} -> "
                f"{after['step_time_s'] / measured:5.2f} | {peak / 1e9:5.2f} GB | "
                f"{before['memory_per_device_bytes'] / peak:5.2f} -> {after['memory_per_device_bytes'] / peak:5.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="demo,llama17m,llama60m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budgets", default="none,tight", help="which of the two budgets to run")
    parser.add_argument("--tight", type=float, default=0.5, help="the tight budget's share of the dynamic memory")
    parser.add_argument("--trials", type=int, default=None, help="also plan with trials=K and report its regret")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repredict", default=None)
    args = parser.parse_args()
    if args.repredict:
        repredict(args.repredict)
        return
    results = []
    for model in args.models.split(","):
        unbudgeted = plans_for(model, None)
        budgets = {"none": None, "tight": tight_budget(unbudgeted[0], args.tight)}
        for budget in [budgets[name] for name in args.budgets.split(",")]:
            plans = unbudgeted if budget is None else plans_for(model, budget)
            before = os.getloadavg()
            runs = measure(model, plans[:5], rounds=args.rounds, steps=args.steps, warmup=args.warmup)
            load = tuple(round(x, 2) for x in (before[0], os.getloadavg()[0]))
            results.append(report(model, budget, plans[:5], runs, load))
            if args.trials:
                trials_regret(model, budget, results[-1], trials=args.trials)
            if args.out:
                with open(args.out, "w") as out:
                    json.dump(results, out, indent=1)
    print("\nregret: " + ", ".join(f"{r['model']}/{r['budget_gb'] or 'none'}: {r['regret']:.1%}" for r in results))


if __name__ == "__main__":
    main()
