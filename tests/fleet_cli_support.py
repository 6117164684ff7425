"""Helpers of the `bitfleet fleet ...` CLI tests: run a command, its connection flags, its errors.

The fixture that keeps the user's own settings out of these tests is ``no_user_settings`` in
conftest.py; a module of CLI tests uses it with
``pytestmark = pytest.mark.usefixtures("no_user_settings")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent_support import FLEET
from typer.testing import CliRunner

from toolkit.cli import app


def fleet_cli(*args: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Any:
    """``bitfleet fleet [prefix...] args...`` run in-process (``prefix``: flags before the rest)."""
    return CliRunner().invoke(app, ["fleet", *prefix, *args], env=env)


def flags(url: str, key_file: Path) -> list[str]:
    """The connection flags of the test fleet on the broker at ``url``."""
    return ["--broker", url, "--fleet", FLEET, "--key-file", str(key_file)]


def one_line(text: str) -> str:
    """The one non-blank line of ``text`` (an assertion error when there are more or none)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def fails_with_one_line(result: Any, *expected: str) -> str:
    """A refused command: exit code 1, nothing on stdout, one ``error:`` line naming it all."""
    assert result.exit_code == 1, result.output
    assert result.stdout == "", result.stdout
    line = one_line(result.output)
    assert line.startswith("error:"), line
    for text in expected:
        assert text in line, line
    return line
