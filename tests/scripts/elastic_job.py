"""Worker script of tests/test_elastic.py: the 12-step run of elastic_training.py, resized and killed on the way.

Started on 2 workers with --max-restarts 1. Every worker saves its state every 2 steps. At step 3 rank 0 asks
for 3 workers (onegpu resize JOB 3); on 3 workers, rank 1 kills itself with SIGKILL at step 5 (first attempt
only: torchelastic restarts all 3, which resume from step 4's state); at step 7 rank 0 asks for 2 again
(onegpu switch Medium --job JOB). Rank 0 appends each step's loss, worker count and attempt to OUT/steps.jsonl
and saves the trained model in OUT/model.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_training import STEPS, build, train_step  # noqa: E402

import onegpu  # noqa: E402

out = Path(sys.argv[1])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
attempt, job = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), os.environ["ONEGPU_JOB"]
model, optimizer = build()
model, optimizer = onegpu.prepare(model, optimizer)
state = out / "state"
start = onegpu.load_state(state)
requests = {(3, 2): ["resize", job, "3"], (7, 3): ["switch", "Medium", "--job", job]}
for step in range(start or 0, STEPS):
    if (step, world, attempt, rank) == (5, 3, 0, 1):
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0 and (step, world) in requests:
        said = subprocess.run([sys.executable, "-m", "onegpu", *requests[step, world]], capture_output=True, text=True)
        print(said.stdout.strip(), file=sys.stderr)
    loss = train_step(model, optimizer, step)
    if rank == 0:
        with open(out / "steps.jsonl", "a") as log:
            log.write(json.dumps({"step": step, "loss": loss, "world": world, "attempt": attempt, "time": time.time()}))
            log.write("\n")
    if step % 2 == 0:
        onegpu.save_state(state, step=step)
onegpu.save_pretrained(model, out / "model")
