"""Batch inference tokens/s: examples/serve.py on N replicas against one plain process, in alternating repeats.

    python bench/serve.py [--workers 2] [--repeats 3] [--prompts 48] [--max-new-tokens 32]

Each repeat runs, one after the other: one plain process (torch's default threads: every core), one plain process
with one thread (what each CPU worker gets), and `onegpu run --workers N` (Plan(dp=N) replicas, one thread each).
The figure is the generation's tokens/s (split, generate, gather; not the start-up). The prompts are lines of the
demo corpus of different lengths; the completions must be the same token ids every way. The machine is shared:
the ratios of one repeat, the median over repeats and the load average say more than any single figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from runs import ROOT, json_result


def prompts(count: int) -> list[str]:
    """``count`` corpus lines cut to 8..60 characters, so the batches are left-padded."""
    lines = [line.strip() for line in (ROOT / "examples/data/corpus.txt").read_text().splitlines() if len(line) > 20]
    return [line[: 8 + (13 * index) % 53] for index, line in enumerate(lines[100 : 100 + count])]


def load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as file:
        file.write("\n".join(prompts(args.prompts)))
    serve = ["examples/serve.py", "--prompts", file.name, "--max-new-tokens", str(args.max_new_tokens), "--json"]
    replicas = f"onegpu {args.workers} replicas"
    ways = {
        "plain": ([sys.executable, *serve], None),
        "plain 1 thread": ([sys.executable, *serve], {**os.environ, "OMP_NUM_THREADS": "1"}),
        replicas: ([sys.executable, "-m", "onegpu", "run", "--workers", str(args.workers), *serve], None),
    }  # fmt: skip
    figures: dict[str, list[float]] = {name: [] for name in ways}
    print(f"{args.prompts} prompts x {args.max_new_tokens} new tokens, batches of 4 | load {load()}")
    for repeat in range(args.repeats):
        results = {name: json_result(command, env=env) for name, (command, env) in ways.items()}
        ids = {name: r["ids"] for name, r in results.items()}
        same = all(i == ids["plain 1 thread"] for i in ids.values())
        for name, r in results.items():
            figures[name].append(r["tokens"] / r["seconds"])
        row = " | ".join(f"{name} {values[-1]:5.0f}" for name, values in figures.items())
        ratio = figures[replicas][-1] / figures["plain 1 thread"][-1]
        print(
            f"repeat {repeat + 1} tokens/s: {row} | ratio {ratio:.2f} | same tokens: {same} | load {load()}", flush=True
        )
    medians = {name: statistics.median(values) for name, values in figures.items()}
    onegpu = medians[replicas]
    print(
        "median tokens/s: " + " | ".join(f"{name} {value:.0f}" for name, value in medians.items()) + " | "
        f"ratio onegpu/plain {onegpu / medians['plain']:.2f}, onegpu/plain 1 thread "
        f"{onegpu / medians['plain 1 thread']:.2f} | load {load()}"
    )
    Path(file.name).unlink()


if __name__ == "__main__":
    main()
