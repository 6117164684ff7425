"""`bitfleet train`: train a registered model on a dataset and write a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import (
    MAX_IMAGE_SIZE,
    check_out_dir,
    cli_command,
    literal,
    number,
    one_of,
    print_json,
    resnet_args,
    say,
)


@cli_command
def train(
    model: Annotated[
        str, typer.Option(help="Registered model (see `bitfleet models`).")
    ] = "bireal18",
    dataset: Annotated[
        str,
        typer.Option(
            help="digits or digits-hard[:N] (bundled; N training images), cifar10, mnist or "
            "imagefolder."
        ),
    ] = "digits",
    out: Annotated[
        Path | None, typer.Option(help="Run directory to write (a checkpoint itself).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 8,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size.")] = 64,
    lr: Annotated[float, typer.Option(callback=number(gt=0), help="Peak learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = "adam",
    schedule: Annotated[str, typer.Option(help="cosine or constant.")] = "cosine",
    weight_decay: Annotated[
        float, typer.Option(callback=number(ge=0), help="Weight decay (float parameters only).")
    ] = 0.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed for initialisation and shuffling.")] = 0,
    data_root: Annotated[
        Path | None, typer.Option(help="Folder with the dataset files (not needed for digits).")
    ] = None,
    channels: Annotated[
        int | None,
        typer.Option(callback=one_of(1, 3), help="Convert images to this many channels (1 or 3)."),
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(min=1, max=MAX_IMAGE_SIZE, help="Resize images to this size.")
    ] = None,
    stem: Annotated[str | None, typer.Option(help="ResNet stem: cifar or imagenet.")] = None,
    width: Annotated[
        float | None, typer.Option(callback=number(gt=0), help="ResNet width multiplier.")
    ] = None,
    attention: Annotated[
        str | None,
        typer.Option(
            help="ResNet / Bi-Real attention: none, se, aw or se+aw (AW-convolution and "
            "squeeze-excitation; see docs/models.md)."
        ),
    ] = None,
    genotype: Annotated[
        Path | None,
        typer.Option(
            help="NASB genotype JSON, the cells to build (--model nasb; `bitfleet search` "
            "writes one; docs/nasb.md describes it)."
        ),
    ] = None,
    teacher: Annotated[
        Path | None, typer.Option(help="Checkpoint of a teacher for knowledge distillation.")
    ] = None,
    kd_alpha: Annotated[
        float, typer.Option(callback=number(ge=0, le=1), help="Weight of the distillation term.")
    ] = 0.9,
    kd_temperature: Annotated[
        float, typer.Option(callback=number(gt=0), help="Distillation temperature.")
    ] = 4.0,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads (default: all cores).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON document.")
    ] = False,
) -> None:
    """Train a float or binary network; the run directory can be evaluated and exported as is."""
    from toolkit.train import TrainConfig
    from toolkit.train import train as run_training

    check_out_dir(out)
    genotype_args: dict[str, object] = {}
    if genotype is not None:
        from models.nasb import Genotype

        # the genotype itself goes into the run's config and spec, so the run needs no file
        genotype_args["genotype"] = Genotype.load(genotype).to_dict()
    config = TrainConfig(
        model=model,
        model_args=resnet_args(stem, width)
        | ({"attention": attention} if attention is not None else {})
        | genotype_args,
        dataset=dataset,
        data_root=str(data_root) if data_root else None,
        channels=channels,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        schedule=schedule,
        weight_decay=weight_decay,
        seed=seed,
        threads=threads,
        teacher=str(teacher) if teacher else None,
        kd_alpha=kd_alpha,
        kd_temperature=kd_temperature,
    )
    result = run_training(config, out, resume=resume, progress=progress and not as_json)
    final = result.final
    summary = {
        "model": model,
        "dataset": dataset,
        "out": str(out) if out else None,
        "epochs": len(result.history),
        "test_accuracy": final.get("test_accuracy"),
        "train_loss": final.get("train_loss"),
        "images_per_s": final.get("images_per_s"),
        "history": result.history,
    }
    if as_json:
        print_json(summary)
        return
    say(
        f"[bold]{literal(model)}[/] on {literal(dataset)}: test accuracy "
        f"{final['test_accuracy']:.4f} after {final['epoch']:.0f} epochs "
        f"({final['images_per_s']:.0f} images/s)"
        + (f"; run written to {literal(out)}" if out else "")
    )
