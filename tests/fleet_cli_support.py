"""Helpers of the `bitfleet fleet ...` CLI tests: run a command, its flags, its errors, its help.

The fixture that keeps the user's own settings out of these tests is ``no_user_settings`` in
conftest.py; a module of CLI tests uses it with
``pytestmark = pytest.mark.usefixtures("no_user_settings")``.
"""

from __future__ import annotations

import re
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


def commands(*path: str) -> list[list[str]]:
    """Every command path below ``bitfleet path...`` (``path`` itself first), for --help checks."""
    from typer.main import get_command

    command: Any = get_command(app)
    for name in path:
        command = command.commands[name]
    found = []

    def walk(cmd: Any, where: list[str]) -> None:
        found.append(where)
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk(sub, [*where, name])

    walk(command, list(path))
    return found


def broken_help_lines(*path: str) -> list[str]:
    """Lines of ``bitfleet path... --help``'s text that end mid-paragraph (a hard line break).

    typer keeps a docstring's single line breaks, so a paragraph wrapped by hand in the source
    shows its breaks at every terminal width. At 250 columns a line of the help text ends
    short only at the end of a paragraph, or before a list item (``1. ``, ``- ``).
    """
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    text = result.output.split("╭")[0]  # the prose, above the boxes of arguments and options
    lines = [line.strip() for line in text.splitlines()]
    return [
        line
        for line, after in zip(lines, lines[1:], strict=False)
        if line and after and len(line) < 200 and not re.match(r"(\d+\.|-) ", after)
    ]
