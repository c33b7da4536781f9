"""The Trainer's ``checkpoint-<step>/`` directories holding onegpu's sharded state.

A checkpoint is ``checkpoint-<step>/step-<step>/`` (onegpu's state: every worker's part of the model and
optimizer through torch.distributed.checkpoint, the LR scheduler, every worker's random state, committed by its
``COMMITTED`` marker) beside the Trainer's own ``trainer_state.json`` and ``rng_state.pth`` (rank 0). It is
complete once the state is committed and ``trainer_state.json``, written last, exists: resuming takes the newest
complete one, and rotation (``save_total_limit``) counts only complete ones, so a save killed half-way neither
resumes nor pushes a complete checkpoint out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from onegpu.errors import UsageError
from onegpu.runtime import state_files

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"


def checkpoint_directory(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step}"


def is_complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds a committed onegpu state and the Trainer's state written after it."""
    return (checkpoint / TRAINER_STATE).is_file() and state_files.newest_state(checkpoint) is not None


def state_directory_of(checkpoint: Path) -> Path:
    """The onegpu state ``checkpoint`` was saved with (at its ``trainer_state.json``'s step), refused in one line
    when absent. Not a later one: a resize may have saved one beside it, which the Trainer's state does not match."""
    step = json.loads((checkpoint / TRAINER_STATE).read_text())["global_step"]
    state = state_files.step_directory(checkpoint, step)
    if not (state / state_files.COMMITTED).is_file():
        raise UsageError(f"{checkpoint} holds no committed onegpu state of step {step}: resume from another checkpoint")
    return state


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def last_complete(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``run_dir`` (what ``resume_from_checkpoint=True`` resumes), or None."""
    done = [path for _, path in _checkpoints(Path(run_dir)) if is_complete(path)]
    return done[-1] if done else None


def check_resumable(checkpoint: str | os.PathLike) -> Path:
    """``checkpoint`` as a path, refused in one line when it holds no onegpu state to resume from."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise UsageError(f"resume_from_checkpoint={str(checkpoint)!r} is not a directory: give a checkpoint-<step> one")
    if not is_complete(path):
        raise UsageError(
            f"{path} holds no committed onegpu state and trainer_state.json (a plain Trainer's checkpoint, or a save "
            "cut short): resume from a checkpoint the onegpu Trainer saved, or load its weights with from_pretrained"
        )
    return path


def rotate(run_dir: str | os.PathLike, *, limit: int | None, keep: Path | None = None) -> None:
    """Keep the newest ``limit`` complete checkpoints (and ``keep``, the best model's); remove older ones, and
    incomplete ones older than the newest complete (a killed save's leftovers). On rank 0, after a save."""
    found = _checkpoints(Path(run_dir))
    complete = [(step, path) for step, path in found if is_complete(path)]
    if not complete:
        return
    newest = complete[-1][0]
    stale = [path for step, path in found if step < newest and not is_complete(path)]
    old = []
    if limit is not None and limit > 0:
        kept = {path for _, path in complete[-limit:]} | ({keep.resolve()} if keep else set())
        old = [path for _, path in complete if path not in kept and path.resolve() not in kept]
    for path in (*stale, *old):
        for state in state_files.committed(path):
            state_files.uncommit(state)  # never a directory that looks whole while it is being removed
        shutil.rmtree(path, ignore_errors=True)
