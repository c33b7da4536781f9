"""Running one benchmark configuration as its own job, and reading the figures it prints."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def json_result(command: list[str], *, env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    """The last JSON line ``command`` prints, run from the repository root; exits with its errors if it fails."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
