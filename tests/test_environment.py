"""The launch environment is read from torchrun's or SLURM's variables; nothing set means one process."""

import pytest

from onegpu.errors import UsageError
from onegpu.launch.environment import current_environment, first_slurm_host
from onegpu.launch.workers import worker_count


def test_torchrun_variables():
    env = current_environment(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node7",
            "MASTER_PORT": "1234",
        }
    )
    assert (env.kind, env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        "torchelastic",
        3,
        4,
        1,
        "node7",
        1234,
    )


def test_slurm_variables():
    env = current_environment(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS_PER_NODE": "4(x2)",
            "SLURM_NODELIST": "gpu[03-04]",
            "SLURM_JOB_ID": "77",
        }
    )
    assert (env.kind, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("slurm", 5, 8, 1, 4)
    assert env.master_addr == "gpu03"


@pytest.mark.parametrize(("nodelist", "first"), [("gpu[03-05,9],cpu1", "gpu03"), ("node1", "node1"), ("a[7]", "a7")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_nothing_set_is_a_single_process():
    assert current_environment({}).world_size == 1


def test_worker_count_sources(monkeypatch):
    monkeypatch.setenv("ONEGPU_WORKERS", "3")
    assert worker_count() == 3
    assert worker_count(5) == 5
    monkeypatch.delenv("ONEGPU_WORKERS")
    assert worker_count() == 2  # CPU-only machine
    with pytest.raises(UsageError, match="at least 1 worker"):
        worker_count(0)


def test_cpu_workers_fork_from_a_server_that_imported_what_the_script_needs(tmp_path):
    """The fork server imports onegpu and the parallel techniques for every job, and transformers' shared code
    when the script or a module of its project imports transformers (here: model.py in the folder above)."""
    from onegpu.launch.forked_workers import PRELOAD, preloaded_modules

    (tmp_path / "jobs").mkdir()
    plain = tmp_path / "jobs" / "plain.py"
    plain.write_text("import torch\nimport onegpu\n")
    assert preloaded_modules(str(plain)) == PRELOAD
    (tmp_path / "model.py").write_text("def build():\n    from transformers import LlamaConfig\n")
    hf = tmp_path / "jobs" / "train.py"
    hf.write_text("import sys\nfrom model import build\n")
    assert preloaded_modules(str(hf)) == (*PRELOAD, "transformers.modeling_utils")
    broken = tmp_path / "jobs" / "broken.py"
    broken.write_text("def (:\n")
    assert preloaded_modules(str(broken)) == PRELOAD  # the worker reports the syntax error, not the launcher
