"""`bitfleet models`: the registered networks."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from ._common import cli_command, console, human, literal, print_json


@cli_command
def list_models_cmd(
    pattern: Annotated[str, typer.Argument(help="Shell-style filter, e.g. 'bireal*'.")] = "*",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """List the registered models with their family and parameter count (defaults: 10 classes)."""
    import models  # torch: imported when the command runs, not for --help

    names = models.list_models(pattern)
    if not names:
        raise ValueError(
            f"no registered model matches {pattern!r}; run `bitfleet models` to list them all"
        )
    rows: list[dict[str, Any]] = []
    for name in names:
        entry = models.model_entry(name)
        net = models.create(name)
        binary = any(getattr(m, "is_binary", False) for m in net.modules())
        rows.append(
            {
                "name": name,
                "family": entry.family,
                "params": sum(p.numel() for p in net.parameters()),
                "binary": binary,
                "description": entry.description,
            }
        )
    if as_json:
        print_json(rows)
        return
    table = Table(title="bitfleet models")
    for column in ("name", "family", "params", "binary", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            literal(row["name"]),
            literal(row["family"]),
            human(row["params"]),
            "yes" if row["binary"] else "no",
            literal(row["description"]),
        )
    console.print(table)
