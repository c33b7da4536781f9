"""Worker script of tests/test_elastic.py: the 12-step run of elastic_training.py, resized and killed on the way.

Started on 2 workers with --max-restarts 1. Every worker saves its state every 2 steps. After step 2 rank 0 asks
for 3 workers (onegpu resize JOB 3): the workers see it at step 3's end and stop there; on 3 workers, rank 1
kills itself with SIGKILL after step 4 (first attempt only: torchelastic restarts all 3, which resume from step
4's state); after step 6 rank 0 asks for 2 again (onegpu switch Medium --job JOB): the job stops after step 7. Rank 0 appends each step's loss, worker count and attempt to OUT/steps.jsonl
and saves the trained model in OUT/model.
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_training import build_run, train  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import onegpu  # noqa: E402
from onegpu.cli import app  # noqa: E402

out = Path(sys.argv[1])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
attempt, job = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), os.environ["ONEGPU_JOB"]
model, optimizer, scheduler, loader = onegpu.prepare(*build_run())
state = out / "state"
start = onegpu.load_state(state)
requests = {(2, 2): ["resize", job, "3"], (6, 3): ["switch", "Medium", "--job", job]}


def after_step(step: int, loss: float) -> None:
    if rank == 0:
        with open(out / "steps.jsonl", "a") as log:
            log.write(json.dumps({"step": step, "loss": loss, "world": world, "attempt": attempt}) + "\n")
    if step % 2 == 0:
        onegpu.save_state(state, step=step)
    if (step, world, attempt, rank) == (4, 3, 0, 1):
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0 and (step, world) in requests:  # the command as a user types it (run here: no new interpreter)
        said = CliRunner().invoke(app, requests[step, world])
        print(said.output.strip(), file=sys.stderr)


train(model, optimizer, scheduler, loader, start=start or 0, after_step=after_step)
onegpu.save_pretrained(model, out / "model")
