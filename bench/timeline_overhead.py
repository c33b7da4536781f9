"""What recording a pipeline's timeline costs, and its measured bubble against the predicted one.

    python bench/timeline_overhead.py [--calls 24] [--schedule 1f1b] [--microbatches 4]

The demo model as a 2-worker pipeline. A job records only calls 2 to 4; here every other call after the
warm-up is recorded (``RECORDED_CALLS`` widened), so recorded and plain calls alternate in the same run on the
same model, and their median times give a same-run ratio. Also prints the bubble read back from the job's
timeline (measured, and predicted by the schedule's theory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import onegpu
    from onegpu.report.timeline import read_timeline
    from onegpu.runtime import timeline
    from onegpu.settings import settings

    sys.path.insert(0, str(ROOT))
    from bench.timing import demo_loader  # noqa: PLC0415
    from examples.demo_data import LR, build_demo_model, load_tokenizer  # noqa: PLC0415

    warmup = 4
    timeline.RECORDED_CALLS = range(warmup + 1, args.calls + 1, 2)  # odd calls after the warm-up
    tokenizer = load_tokenizer()
    loader = demo_loader(tokenizer, max_bytes=2_000_000)
    model = build_demo_model(vocab_size=len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    plan = onegpu.Plan(dp=1, pp=2, microbatches=args.microbatches, schedule=args.schedule)
    model, optimizer, loader = onegpu.prepare(model, optimizer, loader, plan=plan)
    batches, seconds = iter(loader), []
    for _ in range(args.calls):
        batch = next(batches)
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    dist.barrier()
    if dist.get_rank() == 0:
        recorded = [s for call, s in enumerate(seconds, 1) if call in timeline.RECORDED_CALLS]
        plain = [s for call, s in enumerate(seconds, 1) if call > warmup and call not in timeline.RECORDED_CALLS]
        trace = read_timeline(settings().status_dir)
        print(json.dumps({"recorded_s": statistics.median(recorded), "plain_s": statistics.median(plain),
                          "calls": len(recorded), **trace["otherData"]}))  # fmt: skip
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    command = [sys.executable, "-m", "onegpu", "run", "--workers", "2", __file__, "--worker", "--calls", str(args.calls),
               "--schedule", args.schedule, "--microbatches", str(args.microbatches)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    r = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    print(
        f"{args.schedule}, {args.microbatches} micro-batches, 2 workers, {r['calls']} recorded calls between plain ones"
    )
    print(f"median call: recorded {r['recorded_s']:.4f} s, plain {r['plain_s']:.4f} s, "
          f"ratio {r['recorded_s'] / r['plain_s']:.3f}")  # fmt: skip
    print(f"bubble: measured {r['bubble_measured']:.1%}, predicted {r['bubble_predicted']:.1%} "
          f"({r['bubble_predicted_from']})")  # fmt: skip


if __name__ == "__main__":
    main()
