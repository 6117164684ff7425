"""`bitfleet export`: a checkpoint (or run directory) as a packed-bit artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import cli_command, literal, print_json, say


def _parse_shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"--input-shape must be C,H,W (e.g. 3,224,224), got {text!r}")
    return values


@cli_command
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint or run directory to export.")],
    format: Annotated[  # noqa: A002
        str,
        typer.Option(
            "--format",
            "-f",
            help=(
                "onnx (fast, bitfleet runtime), onnx-portable (any ONNX runtime), onnx-trt "
                "(TensorRT's parser: int8 +-1 convolutions between Q/DQ at scale 1), tensorrt "
                "(an INT8/FP16 engine built from it; needs tensorrt and a GPU: run it on the "
                "device) or tflite (LiteRT / tflite-runtime on a Raspberry Pi: binary layers as "
                "exact int8 or float convolutions, see --binary-form)."
            ),
        ),
    ] = "onnx",
    out: Annotated[
        Path | None, typer.Option(help="Artifact directory (default: CHECKPOINT/artifact-FORMAT).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Artifact name (default: model name).")] = None,
    version: Annotated[str, typer.Option(help="Artifact version.")] = "1",
    input_shape: Annotated[
        str | None,
        typer.Option(
            help="C,H,W when the checkpoint does not record it. A shape other than the recorded "
            "one needs --allow-resize."
        ),
    ] = None,
    allow_resize: Annotated[
        bool,
        typer.Option(
            "--allow-resize",
            help="Export at an --input-shape H,W other than the checkpoint's, for networks that "
            "take any size (global pooling, no fixed image_size in the spec: the ResNets).",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing artifact at --out.")
    ] = False,
    with_weights: Annotated[
        bool,
        typer.Option(
            "--with-weights",
            help="Also ship the float training weights (weights.safetensors, 4 bytes a "
            "parameter), so devices that learn on board start from this model, not from scratch.",
        ),
    ] = False,
    float_parts: Annotated[
        str,
        typer.Option(
            "--float-parts",
            help="fp32, or int8: the float layers' weights (stem, 1x1 shortcuts, classifier) "
            "stored as int8 with a scale per output channel, about 4x smaller; activations stay "
            "float.",
        ),
    ] = "fp32",
    binary_form: Annotated[
        str,
        typer.Option(
            "--binary-form",
            help="tflite only: how binary layers run, all exact. int8: +-1 int8 convolutions over "
            "channel groups small enough to be exact, summed in float (fastest); int4: the same "
            "with weights stored two to a byte (smallest file, slower than float); float: one "
            "float convolution of +-1 values; auto: int8 wherever a kernel fits an exact group.",
        ),
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Export a trained network: packed-bit ONNX, TensorRT ONNX or engine, or TFLite."""
    import exporters
    from edge_agent.protocol import validate_name
    from exporters.artifact import read_manifest

    shape = _parse_shape(input_shape)
    # the name and version become MQTT topic levels and folder names on every device
    if name is not None:
        validate_name(name, "artifact name")
    validate_name(version, "artifact version")
    target = out or checkpoint / f"artifact-{format}"
    path = exporters.export(
        checkpoint,
        target,
        format,
        name=name,
        version=version,
        input_shape=shape,
        allow_resize=allow_resize,
        overwrite=overwrite,
        weights=with_weights,
        float_parts=float_parts,
        binary_form=binary_form,
    )
    manifest = read_manifest(path)
    if as_json:
        print_json({"artifact": str(path), **manifest})
        return
    size = sum(manifest["sizes"].values())
    say(
        f"wrote {literal(path)} ({literal(manifest['format'])}, {size / 1e6:.2f} MB, input "
        f"{'x'.join(str(d) for d in manifest['input']['shape'][1:])})"
    )
