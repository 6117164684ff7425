"""What every command shares: the error boundary, JSON output and the console."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from bitfleet.errors import BitfleetError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

_state = {"debug": False}

# Errors a user can cause and fix: shown as one line. Anything else is a bug: full traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    BitfleetError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PermissionError,
)


def set_debug(enabled: bool) -> None:
    _state["debug"] = enabled


def cli_command(fn: F) -> F:
    """Turn the library's user errors into one ``error: ...`` line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            if _state["debug"]:
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def print_json(document: Any) -> None:
    """Print one JSON document on stdout (machine-readable output of ``--json``)."""
    sys.stdout.write(json.dumps(document, indent=2, default=_default) + "\n")


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def resnet_args(stem: str | None, width: float | None) -> dict[str, object]:
    """Model arguments from the ``--stem`` / ``--width`` flags that were given."""
    given = {"stem": stem, "width": width}
    return {k: v for k, v in given.items() if v is not None}


def human(n: float) -> str:
    """1234567 -> '1.23M' for tables."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"
