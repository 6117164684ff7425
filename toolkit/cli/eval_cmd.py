"""`bitfleet eval`: accuracy of a checkpoint (or run directory) on a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import cli_command, literal, print_json, say


@cli_command
def eval_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint or run directory.")],
    dataset: Annotated[
        str | None, typer.Option(help="Dataset (default: the one it was trained on).")
    ] = None,
    split: Annotated[str, typer.Option(help="train or test.")] = "test",
    data_root: Annotated[Path | None, typer.Option(help="Folder with the dataset files.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Evaluation batch size.")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Evaluate a checkpoint: accuracy and loss on a dataset split."""
    from models import checkpoint as ckpt
    from toolkit.data import load_dataset
    from toolkit.train import evaluate

    loaded = ckpt.load(checkpoint)
    meta = loaded.meta
    name = dataset or meta.get("dataset") or "digits"
    same_data = name == meta.get("dataset")
    root = data_root or (meta.get("data_root") if same_data else None)
    spec_args = loaded.spec.get("args", {})
    data = load_dataset(
        name,
        split,
        root=root,
        channels=spec_args.get("in_channels", meta.get("channels")),
        image_size=spec_args.get("image_size") or (meta.get("image_size") if same_data else None),
    )
    result = evaluate(loaded.model, data, batch_size=batch_size)
    document = {"checkpoint": str(checkpoint), "dataset": name, "split": split, **result}
    if as_json:
        print_json(document)
        return
    say(
        f"{literal(checkpoint)}: accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} "
        f"on {literal(name)}/{literal(split)} ({result['samples']} images)"
    )
