"""`bitfleet info`: what a checkpoint holds, without touching any data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import cli_command, console, human, literal, print_json


@cli_command
def info(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint or run directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Show a checkpoint's model spec, training metadata, size and cost."""
    import models
    from models import checkpoint as ckpt

    loaded = ckpt.load(checkpoint)
    meta = loaded.meta
    size = meta.get("image_size") or 32
    channels = loaded.spec.get("args", {}).get("in_channels", meta.get("channels", 3))
    cost = models.count_ops(loaded.model, (1, channels, size, size))
    files = {p.name: p.stat().st_size for p in sorted(Path(checkpoint).iterdir()) if p.is_file()}
    document = {
        "checkpoint": str(checkpoint),
        "model": loaded.spec,
        "meta": {k: v for k, v in meta.items() if k != "history"},
        "has_optimizer": loaded.has_optimizer,
        "files": files,
        **cost.to_dict(),
    }
    if as_json:
        print_json(document)
        return
    table = Table(title=literal(checkpoint), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    table.add_row("model", literal(f"{loaded.spec['name']} {loaded.spec['args']}"))
    for key in ("dataset", "epoch", "epochs", "complete"):
        if key in meta:
            table.add_row(key, literal(meta[key]))
    metrics = meta.get("metrics", {})
    if "test_accuracy" in metrics:
        table.add_row("test accuracy", f"{metrics['test_accuracy']:.4f}")
    table.add_row("params", human(cost.params))
    table.add_row(
        "flops / bops / ops", f"{human(cost.flops)} / {human(cost.bops)} / {human(cost.ops)}"
    )
    table.add_row("files", literal(", ".join(f"{k} ({human(v)}B)" for k, v in files.items())))
    console.print(table)
