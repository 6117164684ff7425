"""What every command shares: the error boundary, JSON output and the console."""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
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


def literal(value: object) -> str:
    """``value`` as rich markup that prints as is: a path ``runs/[red]x`` stays that text."""
    return escape(str(value))


def say(markup: str) -> None:
    """Print one line of output, never wrapped (a path in it stays whole, to copy)."""
    console.print(markup, soft_wrap=True)


def number(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Callable[[float | None], float | None]:
    """A typer callback for a float option: finite and within the bounds, else a usage error.

    typer's own ``min=``/``max=`` are inclusive and let ``nan`` through; this names the flag
    the same way (``Invalid value for '--lr': must be > 0, got 0``).
    """
    low = gt if gt is not None else ge
    high = lt if lt is not None else le
    if low is not None and high is not None:
        opening, closing = "(" if gt is not None else "[", ")" if lt is not None else "]"
        wanted = f"in {opening}{low:g}, {high:g}{closing}"
    elif low is not None:
        wanted = f"{'>' if gt is not None else '>='} {low:g}"
    else:
        wanted = f"{'<' if lt is not None else '<='} {high:g}"

    def check(value: float | None) -> float | None:
        if value is None:
            return None
        inside = (
            math.isfinite(value)
            and (gt is None or value > gt)
            and (ge is None or value >= ge)
            and (lt is None or value < lt)
            and (le is None or value <= le)
        )
        if not inside:
            raise typer.BadParameter(f"must be {wanted}, got {value:g}")
        return value

    return check


def one_of(*choices: int) -> Callable[[int | None], int | None]:
    """A typer callback for an int option that takes only ``choices`` (or is left out)."""

    def check(value: int | None) -> int | None:
        if value is not None and value not in choices:
            allowed = " or ".join(str(c) for c in choices)
            raise typer.BadParameter(f"must be {allowed}, got {value}")
        return value

    return check


def int_list(text: str, flag: str) -> tuple[int, ...]:
    """``"1,2"`` -> ``(1, 2)``: positive integers, or a ValueError that names ``flag``."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must list positive integers, e.g. 1,2; got {text!r}")
    return values


def check_out_dir(out: Path | None, flag: str = "--out") -> None:
    """Refuse an output folder that is an existing file, before any work starts."""
    if out is not None and out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{flag} {out} is a file, not a folder; choose another {flag}")


#: Largest image side the commands accept (a typo such as 22400 would exhaust memory).
MAX_IMAGE_SIZE = 4096


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
