"""Every ONEGPU_* variable is read in one place, parsed with a one-line error, and documented in the README."""

import re
from pathlib import Path

import pytest

from onegpu.errors import UsageError
from onegpu.settings import VARIABLES, markdown_table, settings

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_documents_every_variable_users_set():
    assert markdown_table() in (ROOT / "README.md").read_text()


def test_no_other_module_reads_an_onegpu_variable():
    readers = re.compile(r"environ(?:\.get)?\s*[\[(]\s*[\"']ONEGPU_|getenv\(\s*[\"']ONEGPU_")
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "onegpu").rglob("*.py")
        if path.name != "settings.py" and readers.search(path.read_text())
    ]
    assert offenders == []


def test_values_are_parsed_and_defaults_apply(monkeypatch):
    for variable in VARIABLES:
        monkeypatch.delenv(variable.name, raising=False)
    assert settings().collective_timeout_s == 600.0 and settings().workers is None
    monkeypatch.setenv("ONEGPU_COLLECTIVE_TIMEOUT", "3")
    monkeypatch.setenv("ONEGPU_DEVICES", "2,3")
    assert settings().collective_timeout_s == 3.0 and settings().devices == (2, 3)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "ONEGPU_WORKERS",
            "two",
            "ONEGPU_WORKERS='two' is not a whole number: set it to the number of workers, e.g. 2",
        ),
        (
            "ONEGPU_COLLECTIVE_TIMEOUT",
            "-1",
            "ONEGPU_COLLECTIVE_TIMEOUT='-1' is not a positive number: set it to the seconds a collective may wait, "
            "e.g. 600",
        ),
        ("ONEGPU_PRINT_ALL_RANKS", "yes", "ONEGPU_PRINT_ALL_RANKS='yes' is not 0 or 1: set it to 1 or 0, e.g. 1"),
    ],
)
def test_a_malformed_value_is_one_line_naming_the_variable(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(UsageError) as caught:
        settings()
    assert str(caught.value) == message
