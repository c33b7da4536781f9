"""States that cannot be used: faults_state.py MODE DIRECTORY [TAG]; each mode ends in onegpu's one line.

``other-model``: a state saved from one model, loaded into another (every worker names the first parameter
that differs). ``unwritable``: states asked for under a path that is a file, refused before any step.
A last argument starting with "badinput-" only tags the processes.
"""

import sys
from pathlib import Path

import torch
from torch import nn

import onegpu

mode, directory = [a for a in sys.argv[1:] if not a.startswith("badinput-")]
directory = Path(directory)


def prepared(hidden: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    return onegpu.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))


if mode == "other-model":
    prepared(8)
    onegpu.save_state(directory, step=0)
    prepared(6)
    onegpu.load_state(directory)
elif mode == "unwritable":
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.parent.joinpath("notes.txt").write_text("a file, not a directory\n")
    prepared(8)
    onegpu.load_state(directory.parent / "notes.txt" / "states")
raise SystemExit(f"faults_state.py: mode {mode!r} did not fail")
