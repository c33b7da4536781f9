"""Every bad input and fault of the table in tests/bad_input.py ends in one line that says what to do, a
non-zero exit, and nothing left behind: no process, no leased device."""

from __future__ import annotations

import pytest
from bad_input import ROWS, check_row, run_row


def _param(row):
    """A row that starts workers runs the real CLI in processes of its own: a slow test."""
    return pytest.param(row, id=row.id, marks=[pytest.mark.slow] if row.starts_workers else [])


@pytest.mark.parametrize("row", [_param(row) for row in ROWS])
def test_bad_input_gets_one_line_and_loses_nothing(row, tmp_path):
    check_row(row, run_row(row, tmp_path / "home"))
