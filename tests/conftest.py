import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture(autouse=True)
def no_leaked_environment():
    """A test must not leave distributed variables behind for the next one."""
    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ONEGPU_LAUNCHED")}
    yield
    after = {k: os.environ.get(k) for k in before}
    assert after == before, f"environment leaked: {before} -> {after}"
