import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the tests' jobs lease devices from a pool of their own, never from the user's
os.environ.setdefault("ONEGPU_HOME", tempfile.mkdtemp(prefix="onegpu-tests-"))
sys.path.insert(0, str(Path(__file__).parent))


def run_onegpu(
    *args: str, timeout: float = 120, env: dict | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "onegpu", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def launch_script(tmp_path_factory, script: str, *, workers: int) -> tuple[Path, dict]:
    """Run ``tests/scripts/<script>`` on ``workers`` workers; its output directory and results.json."""
    import json

    out = tmp_path_factory.mktemp(f"{Path(script).stem}{workers}")
    env = None
    if workers > 4:  # more than the tests' pool of 4 CPU slots: a pool of its own
        home = tmp_path_factory.mktemp("pool")
        (home / "pool.toml").write_text(f"cpu_slots = {workers}\nslot_memory_gb = 2\n")
        env = {"ONEGPU_HOME": str(home)}
    result = run_onegpu("run", "--workers", str(workers), f"tests/scripts/{script}", str(out), timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(autouse=True)
def no_leaked_environment():
    """A test must not leave distributed variables behind for the next one."""
    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ONEGPU_LAUNCHED")}
    yield
    after = {k: os.environ.get(k) for k in before}
    assert after == before, f"environment leaked: {before} -> {after}"
