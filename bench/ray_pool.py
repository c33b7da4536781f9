"""The same job on this machine's pool and on a Ray pool (issue 16): what the Ray launcher costs.

    python bench/ray_pool.py [--workers 2] [--steps 60] [--repeats 2]

Starts a Ray cluster of --workers fake nodes on this machine (``ray.cluster_utils``, one device slot each, so
every worker is on a node of its own and talks to the others across "nodes"), then runs the demo
(examples/train_llama.py, a 0.84M-parameter Llama) on --workers workers, alternately on the local pool
(torchrun) and on the Ray pool, --repeats times each. Prints, per run: the time from ``onegpu run`` to its
first step's line, the whole run, the steady throughput the demo reports, and the CPU seconds Ray's own
processes (GCS, raylets, actors) used meanwhile; then the Ray/local ratios of the medians. Both pools use the same machine, cores and gloo over loopback: a ratio near 1 on throughput
says the Ray launcher adds nothing per step; the start-up difference is Ray's (connecting, a placement
group, an actor per device).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DONE = re.compile(r"Done: \d+ steps in [\d.]+ s, (\d+) tokens/sec")


def run(*, home: Path, workers: int, steps: int, out: Path) -> dict[str, float]:
    """One ``onegpu run`` of the demo: seconds to the first step's line, seconds in all, tokens/s."""
    # the fake nodes share this machine's cores: one thread per worker on both pools (a real node divides its own)
    env = {**os.environ, "ONEGPU_HOME": str(home), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "onegpu", "run", "--workers", str(workers), "examples/train_llama.py",
               "--steps", str(steps), "--log-every", "1", "--out", str(out)]  # fmt: skip
    began = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first, throughput = None, None
    for line in process.stdout:
        if first is None and line.startswith("[Step 1/"):
            first = time.monotonic() - began
        if found := DONE.search(line):
            throughput = float(found.group(1))
    _, errors = process.communicate()
    if process.returncode != 0 or first is None or throughput is None:
        raise SystemExit(f"the run failed ({process.returncode}): {errors[-2000:]}")
    return {"first_step_s": first, "total_s": time.monotonic() - began, "tokens_per_s": throughput}


def ray_cpu_seconds() -> float:
    """CPU seconds used so far by Ray's own processes on this machine (GCS, raylets, actors, idle workers; Linux)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "onegpu" in command or not any(k in command for k in ("ray::", "raylet", "gcs_server", "ray/_private")):
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, ValueError, IndexError):
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    from ray.cluster_utils import Cluster

    scratch = Path(tempfile.mkdtemp(prefix="onegpu-bench-ray-"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for _ in range(options.workers):
            cluster.add_node(num_cpus=1, resources={"onegpu_device": 1})
        homes = {"local": scratch / "local", "ray": scratch / "ray"}
        for home in homes.values():
            home.mkdir()
        (homes["local"] / "pool.toml").write_text(f"cpu_slots = {options.workers}\nslot_memory_gb = 4\n")
        (homes["ray"] / "pool.toml").write_text(
            f'backend = "ray"\naddress = "{cluster.address}"\ndevice_resource = "onegpu_device"\nslot_memory_gb = 4\n'
        )
        runs: dict[str, list[dict[str, float]]] = {"local": [], "ray": []}
        print(f"demo Llama, {options.workers} workers, {options.steps} steps; local pool vs Ray pool of "
              f"{options.workers} fake nodes on this machine")  # fmt: skip
        print(f"{'pool':6} {'first step s':>13} {'total s':>9} {'tokens/s':>9} {'Ray CPU s':>10}")
        for repeat in range(options.repeats):
            for pool in ("local", "ray"):
                before = ray_cpu_seconds()
                measured = run(home=homes[pool], workers=options.workers, steps=options.steps,
                               out=scratch / f"out-{pool}-{repeat}")  # fmt: skip
                measured["ray_cpu_s"] = ray_cpu_seconds() - before
                runs[pool].append(measured)
                print(f"{pool:6} {measured['first_step_s']:13.1f} {measured['total_s']:9.1f} "
                      f"{measured['tokens_per_s']:9.0f} {measured['ray_cpu_s']:10.1f}", flush=True)  # fmt: skip
        for key, label in (("first_step_s", "first step"), ("total_s", "whole run"), ("tokens_per_s", "tokens/s")):
            local = statistics.median(r[key] for r in runs["local"])
            ray = statistics.median(r[key] for r in runs["ray"])
            print(f"Ray / local, {label}: {ray / local:.2f} (medians {ray:.1f} vs {local:.1f})")
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
