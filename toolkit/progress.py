"""The one look of the toolkit's step progress bars (training, search, compression).

Every long loop shows the same columns: a bold label, the bar, steps done of the total, a free
``status`` field (the loss, an accuracy) and the time left. rich is imported only when a bar is
actually shown, so a run with progress off never pays for it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["step_progress"]


def step_progress(label: str, *, stderr: bool = False, elapsed: bool = False) -> Any:
    """A ``rich.progress.Progress`` (not started) with the toolkit's columns.

    Args:
        label: the label column's template; ``{task.description}`` inserts each task's name.
        stderr: draw on stderr (commands whose stdout may carry ``--json``).
        elapsed: add the time spent before the time left.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[Any] = [
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    if elapsed:
        columns.append(TimeElapsedColumn())
    columns.append(TimeRemainingColumn())
    return Progress(*columns, console=Console(stderr=True) if stderr else None)
