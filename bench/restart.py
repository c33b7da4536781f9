"""Restart-to-first-step time after a kill -9 (issue 15): how long a job of ``onegpu run --max-restarts`` is
without a step when one of its workers dies.

    python bench/restart.py [--workers 2] [--kill-at 6] [--repeats 1]

Runs the demo model (0.8M-parameter Llama, the demo corpus) on --workers workers with --max-restarts 1,
saving its state (onegpu.save_state) every 2 steps. Once the job has taken --kill-at steps, rank 1 is sent
SIGKILL from outside. torchelastic stops the others and starts all of them again; they load the last state
and train on. Prints, per run: the time from the kill to the end of the first step after it, split into the
new workers' start (the failure detected, the survivors stopped, new processes up with torch imported; the
script's own imports, model and data built; prepare), load_state, and the first step; beside it the same
job's first start (launcher to first step) and its steady step time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(out: Path) -> None:
    """One worker of the measured job: rank 0 logs when each phase ended."""
    began = time.time()  # the process is up, torch imported (by onegpu's worker entry point)
    import onegpu
    from bench.models import MODELS

    demo = MODELS["demo"]
    model = demo.build()
    optimizer = __import__("torch").optim.AdamW(model.parameters(), lr=1e-3)
    loader = demo.loader()
    built = time.time()
    model, optimizer, loader = onegpu.prepare(model, optimizer, loader)
    rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    (out / f"rank-{rank}-{attempt}.pid").write_text(str(os.getpid()))

    def log(**record) -> None:
        if rank == 0:
            with open(out / "log.jsonl", "a") as handle:
                handle.write(json.dumps({"attempt": attempt, "time": time.time(), **record}) + "\n")

    log(event="began", time=began)
    log(event="built", time=built)
    log(event="load-begins")
    start = onegpu.load_state(out / "state")
    log(event="loaded", start=start)
    for step, batch in enumerate(loader, start=start or 0):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        log(event="step", step=step)
        if step % 2 == 0:
            onegpu.save_state(out / "state", step=step)
        if step >= 40:
            break


def one_run(*, workers: int, kill_at: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="onegpu-restart-") as directory:
        out = Path(directory)
        launched = time.time()
        job = subprocess.Popen(
            [sys.executable, "-m", "onegpu", "run", "--workers", str(workers), "--max-restarts", "1", __file__,
             "--worker", str(out)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
        )  # fmt: skip
        while len(_records(out, event="step", attempt=0)) < kill_at:
            if job.poll() is not None:
                raise SystemExit(f"the job ended before step {kill_at}:\n{job.stderr.read()[-3000:]}")
            time.sleep(0.01)
        killed = time.time()
        os.kill(int((out / "rank-1-0.pid").read_text()), signal.SIGKILL)
        while not _records(out, event="step", attempt=1):
            if job.poll() is not None:
                raise SystemExit(f"the job did not come back after the kill:\n{job.stderr.read()[-3000:]}")
            time.sleep(0.01)
        job.wait(timeout=600)
        steps0 = [r["time"] for r in _records(out, event="step", attempt=0)]
        began, built = _records(out, event="began", attempt=1)[0], _records(out, event="built", attempt=1)[0]
        begins, loaded = _records(out, event="load-begins", attempt=1)[0], _records(out, event="loaded", attempt=1)[0]
        first = _records(out, event="step", attempt=1)[0]
        return {
            "restart_to_first_step_s": round(first["time"] - killed, 2),
            "workers_start_s": round(begins["time"] - killed, 2),
            "process_up_s": round(began["time"] - killed, 2),  # detected, stopped, new processes up, torch imported
            "build_s": round(built["time"] - began["time"], 2),  # onegpu and transformers imported, model built
            "prepare_s": round(begins["time"] - built["time"], 2),  # process group joined, plan chosen and applied
            "load_state_s": round(loaded["time"] - begins["time"], 3),
            "first_step_s": round(first["time"] - loaded["time"], 3),
            "resumed_at_step": loaded["start"],
            "first_start_s": round(steps0[0] - launched, 2),
            "step_s": round(statistics.median(b - a for a, b in zip(steps0, steps0[1:])), 3),
            "job_exit_code": job.returncode,
        }


def _records(out: Path, **match) -> list[dict]:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except OSError:
        return []
    records = [json.loads(line) for line in lines if line.endswith("}")]
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-at", type=int, default=6, help="kill rank 1 once the job has taken this many steps")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    runs = [one_run(workers=args.workers, kill_at=args.kill_at) for _ in range(args.repeats)]
    for run in runs:
        print(
            f"kill -9 of rank 1 of {args.workers} at step {args.kill_at}: first step after it in "
            f"{run['restart_to_first_step_s']:.2f} s (workers started {run['workers_start_s']:.2f} s: processes up "
            f"{run['process_up_s']:.2f}, build {run['build_s']:.2f}, prepare {run['prepare_s']:.2f}; load_state "
            f"{run['load_state_s']:.3f} s, first step {run['first_step_s']:.3f} s; resumed at step "
            f"{run['resumed_at_step']}) | first start {run['first_start_s']:.2f} s, step {run['step_s']:.3f} s"
        )
    print(json.dumps({"workers": args.workers, "runs": runs}))


if __name__ == "__main__":
    main()
