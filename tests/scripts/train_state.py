"""Worker script: states saved under one plan and loaded under others (tests/test_state.py).

``train_state.py OUT STATES [RUN ...]``, each RUN ``name:scenario:plan:action`` with action ``save@STEP``
(train from scratch, save after STEP and go on: the uninterrupted run on this plan; ``async@STEP`` saves
asynchronously) or ``load=NAME``
(continue from the state RUN NAME saved). Every worker's steps go to OUT/results.json.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import write_gathered  # noqa: E402
from state_runs import train_state  # noqa: E402

import onegpu  # noqa: E402
from onegpu.plan import Plan  # noqa: E402

PLANS = {
    "ddp2": Plan(dp=2),
    "zero1-2": Plan(dp=2, sharding="optimizer"),
    "tp2": Plan(dp=1, tp=2),
    "pp2": Plan(dp=1, pp=2, microbatches=5, schedule="1f1b"),
    "fsdp3": Plan(dp=3, sharding="parameters"),
    "offload3": Plan(dp=3, offload="optimizer"),
    "ddp4": Plan(dp=4),
    "fsdp4": Plan(dp=4, sharding="parameters"),
    "zero1-4": Plan(dp=4, sharding="optimizer"),
}
out, states = Path(sys.argv[1]), Path(sys.argv[2])
report = {}
for run in sys.argv[3:]:
    name, scenario, plan, action = run.split(":")
    if action.startswith(("save@", "async@")):
        kind, stop = action.split("@")
        report[name] = train_state(scenario, prepare=onegpu.prepare, plan=PLANS[plan], directory=states / name,
                                   stop=int(stop), asynchronous=kind == "async")  # fmt: skip
    else:
        directory = states / action.split("=")[1]
        report[name] = train_state(scenario, prepare=onegpu.prepare, plan=PLANS[plan], directory=directory, resume=True)
write_gathered(report, str(out / "results.json"))
