"""`bitfleet bench`: latency of the exported flavours against the same network in FP32 ONNX."""

from __future__ import annotations

import inspect as pyinspect
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import MAX_IMAGE_SIZE, cli_command, console, human, int_list, literal, print_json


@cli_command
def bench(
    model: Annotated[
        str, typer.Argument(help="Checkpoint/run directory, or a registered model name.")
    ],
    stem: Annotated[
        str | None, typer.Option(help="Stem, for a model name (default imagenet).")
    ] = None,
    attention: Annotated[
        str | None,
        typer.Option(help="Attention, for a ResNet-family model name: none, se, aw or se+aw."),
    ] = None,
    input_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_IMAGE_SIZE,
            help="Input height/width (default: the checkpoint's, or 224 for a model name).",
        ),
    ] = None,
    threads: Annotated[str, typer.Option(help="Thread counts to measure, e.g. 1,2.")] = "1",
    batch: Annotated[int, typer.Option(min=1, max=4096, help="Batch size.")] = 1,
    repeats: Annotated[
        int, typer.Option(min=1, help="Timed runs per flavour (median reported).")
    ] = 30,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs first.")] = 3,
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="Time each step of the fast runtime.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Time fast and portable artifacts vs FP32 ONNX (interleaved medians), with sizes."""
    import models
    from toolkit.bench import benchmark

    counts = int_list(threads, "--threads")
    if not model.strip():
        raise ValueError("MODEL is empty: give a checkpoint directory or a registered model name")
    if Path(model).exists():
        from models import checkpoint

        if attention is not None:
            raise ValueError(
                "--attention is for a model name; a checkpoint's spec already fixes its attention"
            )
        loaded = checkpoint.load(model)
        net, meta = loaded.model, loaded.meta
        channels = loaded.spec["args"].get("in_channels", meta.get("channels", 3))
        fixed = loaded.spec["args"].get("image_size")
        size = input_size if input_size is not None else fixed or meta.get("image_size") or 32
        if fixed is not None and size != fixed:
            raise ValueError(
                f"--input-size {size}: {loaded.spec['name']} is built for {fixed}x{fixed} input "
                "(its spec fixes image_size); leave --input-size out"
            )
    else:
        factory = models.model_entry(model).factory
        accepted = set(pyinspect.signature(factory).parameters)
        args: dict[str, object] = {}
        if "stem" in accepted:
            args["stem"] = stem or "imagenet"
        elif stem is not None:
            raise ValueError(f"model '{model}' has no stem option; drop --stem")
        if attention is not None:
            if "attention" not in accepted:
                raise ValueError(f"model '{model}' has no attention option; drop --attention")
            args["attention"] = attention
        imagenet = args.get("stem") == "imagenet"
        if "num_classes" in accepted:
            args["num_classes"] = 1000 if imagenet else 10
        size = input_size if input_size is not None else (224 if imagenet else 32)
        if "image_size" in accepted:
            args["image_size"] = size
        net = models.create(model, **args)
        channels = models.spec_of(net)["args"].get("in_channels", 3)
    result = benchmark(
        net,
        (channels, size, size),
        threads=counts,
        batch=batch,
        repeats=repeats,
        warmup=warmup,
        per_layer=per_layer,
    )
    document = result.to_dict()
    if as_json:
        print_json(document)
        return
    table = Table(title=f"{literal(document['model'])} at {channels}x{size}x{size}, batch {batch}")
    for column in ("threads", "fast onnx ms", "portable ms", "fp32 ms", "fast speed-up"):
        table.add_column(column, justify="right")
    for count, row in document["threads"].items():
        table.add_row(
            count,
            f"{row['onnx_ms']:.2f}",
            f"{row['onnx-portable_ms']:.2f}",
            f"{row['fp32_ms']:.2f}",
            f"{row['speedup_vs_fp32']:.2f}x",
        )
    console.print(table)
    sizes = document["sizes_bytes"]
    console.print(
        "sizes: "
        + ", ".join(f"{k} {human(v)}B" for k, v in sizes.items())
        + f"  (fp32/fast = {document['size_ratio_fp32_vs_onnx']:.1f}x); "
        f"first call (load + run) {document['first_call_s']:.2f} s; binary kernels: "
        f"{document['kernels_isa']}"
    )
    if per_layer:
        layers = Table(title="fast runtime steps (thread count 1st in --threads)")
        layers.add_column("step")
        layers.add_column("ms", justify="right")
        for step, ms in document["per_layer_ms"].items():
            layers.add_row(literal(step), f"{ms:.3f}")
        console.print(layers)
