"""`bitfleet ops`: parameters, FLOPs, BOPs and OPs of a model, as the binary-net papers count."""

from __future__ import annotations

import inspect
from typing import Annotated

import typer
from rich.table import Table

from ._common import MAX_IMAGE_SIZE, cli_command, console, human, literal, print_json


@cli_command
def ops(
    model: Annotated[str, typer.Argument(help="Registered model name (see `bitfleet models`).")],
    stem: Annotated[
        str | None, typer.Option(help="ResNet stem: 'cifar' or 'imagenet' (default: model's).")
    ] = None,
    input_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_IMAGE_SIZE,
            help="Input height/width (default: 224 with the imagenet stem, else 32).",
        ),
    ] = None,
    in_channels: Annotated[int, typer.Option(min=1, max=1024, help="Input channels.")] = 3,
    num_classes: Annotated[
        int | None,
        typer.Option(min=1, help="Classes (default: 1000 with the imagenet stem, else 10)."),
    ] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Also list every layer.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Count a model's cost: OPs = FLOPs + BOPs / 64 (Bi-Real Net's measure), per image."""
    import models  # torch: imported when the command runs, not for --help
    from toolkit.train import check_input

    accepted = set(inspect.signature(models.model_entry(model).factory).parameters)
    args: dict[str, object] = {}
    if stem is not None:
        if "stem" not in accepted:
            raise ValueError(f"model '{model}' has no stem option; drop --stem")
        args["stem"] = stem
    imagenet = stem == "imagenet"
    size = input_size if input_size is not None else (224 if imagenet else 32)
    if "num_classes" in accepted:
        args["num_classes"] = num_classes or (1000 if imagenet else 10)
    if "in_channels" in accepted:
        args["in_channels"] = in_channels
    if "image_size" in accepted:
        args["image_size"] = size
    net = models.create(model, **args)
    check_input(net, (in_channels, size, size))  # one line, not a traceback, if it cannot
    count = models.count_ops(net, (1, in_channels, size, size))
    result = {
        "model": model,
        "input_shape": [1, in_channels, size, size],
        **count.to_dict(per_layer),
    }
    if as_json:
        print_json(result)
        return
    table = Table(title=f"{literal(model)} at {in_channels}x{size}x{size}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key in ("params", "flops", "bops", "ops"):
        table.add_row(key, f"{human(result[key])}  ({result[key]:.3g})")
    console.print(table)
    if per_layer:
        layers = Table(title="layers")
        for column in ("layer", "kind", "binary", "MACs", "output"):
            layers.add_column(column)
        for layer in count.layers:
            layers.add_row(
                literal(layer.name),
                literal(layer.kind),
                "yes" if layer.binary else "",
                human(layer.macs),
                "x".join(map(str, layer.output_shape)),
            )
        console.print(layers)
