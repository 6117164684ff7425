"""What every command shares: the error boundary, JSON output and the console."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from bitfleet.errors import BitfleetError, missing_extra

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
        except ImportError as err:
            # a module of an extra this install left out: say which extra, not a traceback
            if _state["debug"] or (missing := missing_extra(err)) is None:
                raise
            _fail(missing)
        except USER_ERRORS as err:
            if _state["debug"]:
                raise
            _fail(err)

    return wrapper  # type: ignore[return-value]


def _fail(err: BaseException) -> None:
    """Print ``err`` as one ``error:`` line and exit with code 1."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    # the message is text, not rich markup: "[train]" or a path like ".../MNIST/raw[1]" stays
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


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
