"""What onegpu's per-step metrics cost: the demo's model and loop (examples/train_llama.py: Llama, AdamW, clipping,
a DataLoader of 16 x 128 tokens) on 2 workers, with metrics on and off (``ONEGPU_METRICS=0``).

    python bench/metrics_overhead.py [--workers 2] [--steps 50] [--warmup 10] [--rounds 3]

Three figures, per round and in all (median):

- jobs: jobs with metrics on and off (``ONEGPU_METRICS=0``) alternate, and the ratio of their median step times is
  printed; whole jobs move with the machine's load, so on a loaded machine this ratio is mostly noise;
- same run: inside the job with metrics on, rank 0's metrics are paused (its hooks return at once) every other block
  of ``BLOCK`` steps; the ratio of the median step times of the blocks measured and paused;
- step's end: the seconds rank 0 spends in onegpu's metrics at each step's end (between an optimizer hook
  registered before ``prepare`` and one registered after it), as a share of the step.

The machine's load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 4


def worker(out: Path, *, steps: int, warmup: int) -> None:
    """One job's loop: the demo's, timed step by step on rank 0."""
    sys.path.insert(0, str(ROOT / "examples"))
    import torch
    from demo_data import GLOBAL_BATCH, LR, SEQ_LEN, TextChunks, build_demo_model, load_tokenizer
    from torch.utils.data import DataLoader

    import onegpu
    from onegpu.runtime import step_metrics

    tokenizer = load_tokenizer()
    chunks = TextChunks(seq_len=SEQ_LEN, tokenizer=tokenizer)
    model = build_demo_model(vocab_size=len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loader = DataLoader(chunks, batch_size=GLOBAL_BATCH, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    ends: list[float] = []
    optimizer.register_step_post_hook(lambda *_: ends.append(time.perf_counter()))  # before onegpu's hooks
    model, optimizer, loader = onegpu.prepare(model, optimizer, loader)
    metrics_s: list[float] = []
    optimizer.register_step_post_hook(lambda *_: metrics_s.append(time.perf_counter() - ends[-1]))  # after them
    meter = step_metrics._current[0]  # None with ONEGPU_METRICS=0
    step, started, times, measured = 0, time.perf_counter(), [], []
    while step < steps:
        for batch in loader:
            measured.append(meter is not None and (step // BLOCK) % 2 == 0)
            step_metrics._current[0] = meter if measured[-1] else None  # paused: its hooks return at once
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            loss.item()
            now = time.perf_counter()
            times.append(now - started)
            started, step = now, step + 1
            if step == steps:
                break
    if onegpu.is_main_process():
        on = [t for i, t in enumerate(times) if i >= warmup and measured[i]]
        off = [t for i, t in enumerate(times) if i >= warmup and not measured[i]]
        kept = [s for i, s in enumerate(metrics_s) if i >= warmup and measured[i]] or [0.0]
        out.write_text(json.dumps({"step_s": statistics.median(on or off), "metrics_s": statistics.median(kept),
                                   "same_run": statistics.median(on) / statistics.median(off) if on else None}))  # fmt: skip


def job(*, metrics: bool, workers: int, steps: int, warmup: int, home: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        env = {**os.environ, "ONEGPU_HOME": str(home), "ONEGPU_METRICS": "1" if metrics else "0"}
        command = [sys.executable, "-m", "onegpu", "run", "--workers", str(workers), __file__, "--worker", str(out),
                   "--steps", str(steps), "--warmup", str(warmup)]  # fmt: skip
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the job failed: {done.stderr[-2000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker, steps=args.steps, warmup=args.warmup)
    how = {"workers": args.workers, "steps": args.steps, "warmup": args.warmup}
    ratios, shares, same = [], [], []
    with tempfile.TemporaryDirectory() as home:
        for round_ in range(args.rounds):
            on, off = job(metrics=True, home=Path(home), **how), job(metrics=False, home=Path(home), **how)
            ratios.append(on["step_s"] / off["step_s"])
            shares.append(on["metrics_s"] / on["step_s"])
            same.append(on["same_run"])
            print(f"round {round_ + 1}: jobs {on['step_s'] * 1e3:.1f} ms on, {off['step_s'] * 1e3:.1f} ms off: ratio "
                  f"{ratios[-1]:.4f} | same run: ratio {same[-1]:.4f} | metrics at the step's end "
                  f"{on['metrics_s'] * 1e6:.0f} us ({100 * shares[-1]:.3f} % of the step) | load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    print(f"median over {args.rounds} rounds: jobs on/off {statistics.median(ratios):.4f} | same run on/paused "
          f"{statistics.median(same):.4f} | metrics at the step's end {100 * statistics.median(shares):.3f} % of the "
          f"step | load average {os.getloadavg()[0]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
