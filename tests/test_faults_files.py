"""save_pretrained never replaces a user's file, always leaves the old or the new checkpoint at the path,
even when killed at any step of the save, and never leaves its hidden copies behind a later save."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

import onegpu
from onegpu.errors import UsageError
from onegpu.runtime import checkpoint


def filled(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(256, 256)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)
    return model


def saved_value(path) -> float:
    """The one value every weight of the checkpoint at ``path`` holds."""
    values = torch.cat([t.flatten() for t in load_file(path / "model.safetensors").values()]).unique()
    assert len(values) == 1, f"a mixed checkpoint: {values}"
    return values.item()


def test_saving_over_a_file_is_refused_before_any_work_and_the_file_is_kept(tmp_path, monkeypatch):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    monkeypatch.setattr(checkpoint, "full_state_dict", lambda model: pytest.fail("the state was gathered"))
    with pytest.raises(UsageError, match=r"^save_pretrained: .*notes\.txt is a file: give the path of a directory"):
        onegpu.save_pretrained(filled(1), notes)
    with pytest.raises(UsageError, match=r"notes\.txt is a file"):
        onegpu.save_pretrained(filled(1), notes / "ckpt")
    assert notes.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_directory_that_holds_no_checkpoint_is_refused_and_left_as_it_was(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text("{}")  # a config, but not a model's: no weights beside it
    (project / "train.py").write_text("print('hi')")
    with pytest.raises(
        UsageError, match=r"project is a directory that holds no checkpoint \(config.json, train.py\): give a new"
    ):
        onegpu.save_pretrained(filled(1), project)
    assert sorted(p.name for p in project.iterdir()) == ["config.json", "train.py"]


def test_an_earlier_checkpoint_is_replaced_and_what_the_user_added_to_it_is_kept(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()  # a checkpoint another tool wrote, with a tokenizer beside it and a stale shard
    (target / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    (target / "tokenizer.json").write_text("{}")
    (target / "extras").mkdir()
    (target / "extras" / "notes.md").write_text("kept")
    onegpu.save_pretrained(filled(1), target)
    onegpu.save_pretrained(filled(2), target)
    assert saved_value(target) == 2
    assert sorted(p.name for p in target.iterdir()) == [".onegpu", "extras", "model.safetensors", "tokenizer.json"]
    assert (target / "extras" / "notes.md").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_without_an_atomic_swap_the_checkpoint_is_still_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)  # a system without renameat2
    onegpu.save_pretrained(filled(1), tmp_path / "ckpt")
    onegpu.save_pretrained(filled(2), tmp_path / "ckpt")
    assert saved_value(tmp_path / "ckpt") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# A save in a process of its own, killed with SIGKILL at one step; the test then reads what is at the path.
KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
from safetensors.torch import save_file as real_save_file
import onegpu
from onegpu.runtime import checkpoint
from test_faults_files import filled

target, step = Path(sys.argv[1]), sys.argv[2]
die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
real_exchange, real_remove = checkpoint._exchange, checkpoint._remove

def half_written(state, filename, metadata=None):
    real_save_file(state, filename, metadata=metadata)
    os.truncate(filename, os.path.getsize(filename) // 2)
    die()

def swapped(a, b):
    real_exchange(a, b)
    die()

def half_removed(directory):
    (directory / "model.safetensors").unlink()
    die()

patches = {"staged": ("_write", die), "writing": ("save_file", half_written), "written": ("_fsync_tree", die),
           "swapping": ("_exchange", die), "swapped": ("_exchange", swapped), "removing": ("_remove", half_removed)}
name, patch = patches[step]
setattr(checkpoint, name, patch)
onegpu.save_pretrained(filled(2), target)
raise SystemExit("not killed")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("step", "left"),
    [("staged", 1), ("writing", 1), ("written", 1), ("swapping", 1), ("swapped", 2), ("removing", 2)],
)
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint_and_the_next_save_cleans_up(
    tmp_path, step, left
):
    target = tmp_path / "ckpt"
    onegpu.save_pretrained(filled(1), target)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(target), step],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert saved_value(target) == left
    assert len(list(tmp_path.iterdir())) == 2, "the killed save left no copy (the test killed it too late)"
    onegpu.save_pretrained(filled(3), target)
    assert saved_value(target) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.slow
def test_a_first_save_killed_while_writing_leaves_no_checkpoint_and_nothing_after_the_next_save(tmp_path):
    target = tmp_path / "ckpt"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(target), "writing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not target.exists()
    onegpu.save_pretrained(filled(3), target)
    assert saved_value(target) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_copies_of_a_live_save_and_hidden_directories_onegpu_did_not_make_are_left_alone(tmp_path):
    target = tmp_path / "ckpt"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        prefix = checkpoint._copy_prefix(target)
        ours_live = tmp_path / f"{prefix}{live.pid}-abcd1234"
        unmarked = tmp_path / f"{prefix}999999999-abcd1234"  # a dead writer, but no onegpu marker
        for directory in (ours_live, unmarked):
            directory.mkdir()
            (directory / "model.safetensors").write_bytes(b"weights")
        (ours_live / ".onegpu").write_text("")
        onegpu.save_pretrained(filled(1), target)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", ours_live.name, unmarked.name])
    finally:
        live.kill()
        live.wait()
    onegpu.save_pretrained(filled(2), target)  # its writer has ended now: its copy goes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", unmarked.name])
