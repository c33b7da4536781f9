"""What recording every collective in the Flight Recorder costs, per collective (gloo).

    python bench/flight_overhead.py [--pairs 3] [--collectives 3000]

The same loop of small all-reduces (one float: the collective whose fixed cost is largest against its work) runs
in a process group of one process (no network: only the cost of issuing a collective), in fresh processes with
the recorder off (TORCH_FR_BUFFER_SIZE=0) and on at onegpu's size, alternating. It counts the process's CPU time,
not the wall clock, so that other work on a busy machine does not count; the minimum over rounds is compared
(same run). Also times the status read the watchdog makes once a second, and the dump of a hung worker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKER = r"""
import json, sys, time
import torch, torch.distributed as dist
from torch._C._distributed_c10d import _dump_fr_trace_json
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
tensor, n = torch.ones(1), int(sys.argv[1])
for _ in range(500):
    dist.all_reduce(tensor)
rounds = []
for _ in range(9):
    started = time.process_time()
    for _ in range(n):
        dist.all_reduce(tensor)
    rounds.append((time.process_time() - started) / n)
status = time.perf_counter()
for _ in range(100):
    _dump_fr_trace_json(includeCollectives=False)
status = (time.perf_counter() - status) / 100
full = time.perf_counter()
_dump_fr_trace_json(includeCollectives=True)
print(json.dumps({"cpu_s": min(rounds), "status_s": status, "dump_s": time.perf_counter() - full}))
"""


def one_run(*, buffer: int, collectives: int) -> dict:
    env = {**os.environ, "TORCH_FR_BUFFER_SIZE": str(buffer), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", WORKER, str(collectives)], env=env, capture_output=True, text=True)
    return json.loads(done.stdout)


def main() -> None:
    from onegpu.launch.flight import BUFFER_SIZE

    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--collectives", type=int, default=3000)
    args = parser.parse_args()
    runs = {0: [], BUFFER_SIZE: []}
    for _ in range(args.pairs):
        for buffer in runs:
            runs[buffer].append(one_run(buffer=buffer, collectives=args.collectives))
    off = min(r["cpu_s"] for r in runs[0]) * 1e6
    on = min(r["cpu_s"] for r in runs[BUFFER_SIZE]) * 1e6
    print(
        f"CPU time to issue one all_reduce (gloo, 1 float): {off:.1f} us with the recorder off, {on:.1f} us on "
        f"(TORCH_FR_BUFFER_SIZE={BUFFER_SIZE}): {on - off:+.1f} us per collective"
    )
    status = min(r["status_s"] for r in runs[BUFFER_SIZE]) * 1e6
    dump = min(r["dump_s"] for r in runs[BUFFER_SIZE]) * 1e3
    print(
        f"the watchdog's status read, once a second: {status:.1f} us; a hung worker's dump of {BUFFER_SIZE}: {dump:.0f} ms"
    )
    print(f"(load average {os.getloadavg()[0]:.1f}: on a busy machine, differences of a few us are noise)")


if __name__ == "__main__":
    main()
