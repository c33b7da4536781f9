"""Worker script of tests/test_ray_pool.py: the 12-step run of elastic_training.py on a Ray pool, saving its state
every step. On the first attempt, after step 3, rank 0 writes OUT/lose-a-node (the test then removes the node of
a node other than rank 0's); the workers on rank 0's node wait in a collective for the peers that node takes
along, the others sleep until it takes them. Rank 0 appends each
step's loss, worker count and attempt to OUT/steps.jsonl and saves the trained model in OUT/model."""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402
from elastic_training import build_run, train  # noqa: E402

import onegpu  # noqa: E402

out = Path(sys.argv[1])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
model, optimizer, scheduler, loader = onegpu.prepare(*build_run())
state = out / "state"
start = onegpu.load_state(state)


def after_step(step: int, loss: float) -> None:
    if rank == 0:
        with open(out / "steps.jsonl", "a") as log:
            log.write(json.dumps({"step": step, "loss": loss, "world": world, "attempt": attempt}) + "\n")
    onegpu.save_state(state, step=step)
    if (step, attempt) == (3, 0):
        if rank == 0:
            mine = int(os.environ["ONEGPU_DEVICES"].split(",")[0])
            (out / "lose-a-node").write_text(json.dumps({"job": os.environ["ONEGPU_JOB"], "device": mine}))
        if os.environ["GROUP_RANK"] != "0":
            time.sleep(600)
        dist.barrier()


train(model, optimizer, scheduler, loader, start=start or 0, after_step=after_step)
onegpu.save_pretrained(model, out / "model")
