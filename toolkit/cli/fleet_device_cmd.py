"""`bitfleet fleet logs` and `bitfleet fleet infer`: one device's log, and its model on images.

``logs ID`` prints the agent's latest log lines (the ``logs`` command). ``infer ID IMAGE...``
classifies image files on the device: each file is read here (PNG, JPEG and the other formats
Pillow reads, or a ``.npy`` array), converted to the input the served model takes, as its
manifest says (the device's ``status`` reply carries it: shape, channels, normalisation, labels),
and the whole batch travels as one request (:meth:`toolkit.fleet.FleetClient.infer`).

Conversion of an image: to grey (1 channel) or RGB (3), resized to the model's height and width
(bilinear) when it differs, scaled to [0, 1], then ``(x - mean) / std`` per channel with the
manifest's normalisation: the transform :mod:`toolkit.data` applies to training images, so a
picture of a digit gets the same numbers its training twin got. A ``.npy`` of ``uint8`` is
pixels and gets the same conversion (H x W, H x W x C or C x H x W); a float ``.npy`` is the
model's input as is (C x H x W, already normalised).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich import box
from rich.table import Table

from bitfleet.errors import require

from ._common import cli_command, console, err_console, literal, print_json, say
from ._fleet import BrokerOpt, FleetOpt, KeyFileOpt, app, connect, settings, targets, timeout_opt

if TYPE_CHECKING:
    from toolkit.fleet import FleetClient

__all__ = ["ModelInput", "convert", "load_image", "logs", "infer", "softmax"]


def _result(client: FleetClient, device: str, name: str, args: Any, timeout: float) -> Any:
    """The ``result`` of command ``name`` on ``device``; FleetError with the device's error."""
    from toolkit.fleet import FleetError

    reply = client.command(device, name, args, timeout=timeout)
    if not reply.get("ok"):
        raise FleetError(f"{device} refused {name}: {reply.get('error') or 'no reason given'}")
    return reply.get("result")


# ----------------------------------------------------------------------------------- logs
@app.command("logs", epilog="Example: bitfleet fleet logs pi-01 --lines 20.")
@cli_command
def logs(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(metavar="ID", help="The device, by id.")],
    lines: Annotated[
        int, typer.Option("--lines", "-n", min=1, max=1000, help="How many of the latest lines.")
    ] = 100,
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"device": ID, "lines": [...]}.')
    ] = False,
    timeout: Annotated[
        float, timeout_opt("the device's answer (it answers at once when idle)")
    ] = 10.0,
    broker: BrokerOpt = None,
    fleet: FleetOpt = None,
    key_file: KeyFileOpt = None,
) -> None:
    """A device's latest log lines, oldest first (what its agent logs at INFO and above)."""
    from edge_agent.protocol import Command, validate_name
    from toolkit.fleet import FleetError

    validate_name(device, "device id")  # before the broker is tried
    config = settings(ctx, broker, fleet, key_file)
    client = connect(config)
    try:
        [target] = targets(client, config, [device])
        result = _result(client, target, Command.LOGS, {"lines": lines}, timeout)
    finally:
        client.close()
    got = result.get("lines") if isinstance(result, Mapping) else None
    if not isinstance(got, list) or not all(isinstance(line, str) for line in got):
        raise FleetError(f"{device}'s logs reply holds no list of lines (is its agent older?)")
    if as_json:
        print_json({"device": target, "lines": got})
    elif not got:
        say(f"{literal(target)} has logged nothing yet")
    else:
        for line in got:
            typer.echo(line)


# ---------------------------------------------------------------------------------- infer
@dataclass(frozen=True)
class ModelInput:
    """What a served model takes, from its manifest's ``input``: C x H x W and normalisation."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_manifest(cls, spec: Any, device: str = "the device") -> ModelInput:
        """Read a manifest's ``input`` (ValueError, naming ``device``, if it is unusable)."""
        shape = spec.get("shape") if isinstance(spec, Mapping) else None
        dims = shape[1:] if isinstance(shape, list) and len(shape) == 4 else None
        if dims is None or not all(isinstance(d, int) and d > 0 for d in dims):
            raise ValueError(
                f"{device}'s model takes input of shape {shape}; this command sends images "
                "to models that take N x C x H x W batches"
            )
        assert isinstance(spec, Mapping)
        layout = spec.get("layout", "NCHW")
        if layout != "NCHW":
            raise ValueError(f"{device}'s model takes {layout} input; this command sends NCHW")
        channels, height, width = dims
        norm = spec.get("normalisation") or {}
        mean = tuple(float(v) for v in norm.get("mean", [0.0] * channels))
        std = tuple(float(v) for v in norm.get("std", [1.0] * channels))
        if len(mean) != channels or len(std) != channels or not all(s > 0 for s in std):
            raise ValueError(
                f"{device}'s manifest has normalisation {dict(norm)} for {channels} channel(s)"
            )
        return cls(channels, height, width, mean, std)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width


def load_image(path: Path) -> Any:
    """Read ``path``: a loaded PIL image, or a numpy array for ``.npy`` (ValueError naming it)."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name the image files in it (e.g. {path}/*.png)")
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot read {path} as a numpy array: {first}") from None
    Image = require("PIL.Image", "train", "reading image files")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (Image.UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def _pixels(array: np.ndarray, path: Path, model: ModelInput) -> Any:
    """A uint8 array as a PIL image (H x W, H x W x C or C x H x W)."""
    Image = require("PIL.Image", "train", "reading image files")
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(array))
    raise ValueError(
        f"{path} holds uint8 pixels of shape {array.shape}; use H x W, H x W x C or C x H x W "
        f"(this model takes {'x'.join(map(str, model.shape))})"
    )


def convert(raw: Any, path: Path, model: ModelInput) -> np.ndarray:
    """One image (or array) as the model's input: float32 C x H x W, normalised."""
    if isinstance(raw, np.ndarray) and raw.dtype != np.uint8:
        array = raw[0] if raw.ndim == 4 and raw.shape[0] == 1 else raw
        if array.ndim == 2 and model.channels == 1:
            array = array[None]
        if not np.issubdtype(array.dtype, np.number) or tuple(array.shape) != model.shape:
            raise ValueError(
                f"{path} holds a {raw.dtype} array of shape {raw.shape}; a .npy is the model's "
                f"input as is ({'x'.join(map(str, model.shape))}, normalised), or uint8 pixels"
            )
        out = np.asarray(array, dtype=np.float32)
        if not np.isfinite(out).all():
            raise ValueError(f"{path} holds NaN or Inf; the device refuses them")
        return out
    image = _pixels(raw, path, model) if isinstance(raw, np.ndarray) else raw
    if model.channels not in (1, 3):
        raise ValueError(
            f"the model takes {model.channels} channels; image files give 1 (grey) or 3 (RGB): "
            f"send {path.stem}.npy arrays of shape {'x'.join(map(str, model.shape))} instead"
        )
    Image = require("PIL.Image", "train", "reading image files")
    image = image.convert("L" if model.channels == 1 else "RGB")
    if image.size != (model.width, model.height):
        image = image.resize((model.width, model.height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    mean = np.asarray(model.mean, np.float32)[:, None, None]
    std = np.asarray(model.std, np.float32)[:, None, None]
    return np.ascontiguousarray((chw - mean) / std, dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


def _served_manifest(client: FleetClient, device: str, timeout: float) -> dict[str, Any]:
    """The served artifact's manifest input and labels, from the device's ``status`` reply."""
    from edge_agent.protocol import Command
    from toolkit.fleet import FleetError

    status = _result(client, device, Command.STATUS, None, timeout)
    if not isinstance(status, Mapping) or "manifest" not in status:
        raise FleetError(
            f"{device}'s status reply does not say what input its model takes (its agent "
            "predates bitfleet fleet infer; update it)"
        )
    manifest = status["manifest"]
    if not isinstance(manifest, Mapping) or not manifest.get("input"):
        raise FleetError(f"{device} serves no model yet; deploy one first (bitfleet fleet deploy)")
    return {**manifest, "model": status.get("model"), "version": status.get("version")}


def _label(labels: Any, index: int) -> str:
    if isinstance(labels, list) and 0 <= index < len(labels):
        return str(labels[index])
    return str(index)


@app.command(
    "infer",
    epilog=(
        "Example: bitfleet fleet infer pi-01 seven.png cat.jpg. Each image is converted here to "
        "the model's input (channels, size and normalisation from its manifest: grey or RGB, "
        "resized, scaled to [0, 1], (x - mean) / std) and all travel as one batch. A uint8 .npy "
        "is pixels; a float .npy is the model's input as is (C x H x W, normalised)."
    ),
)
@cli_command
def infer(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(metavar="ID", help="The device, by id.")],
    images: Annotated[
        list[Path],
        typer.Argument(metavar="IMAGE...", help="Image files (PNG, JPEG, ...) or .npy arrays."),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document: per image and the batch.")
    ] = False,
    timeout: Annotated[float, timeout_opt("the device's answer (one batch)")] = 30.0,
    broker: BrokerOpt = None,
    fleet: FleetOpt = None,
    key_file: KeyFileOpt = None,
) -> None:
    """Classify images on a device with the model it serves: top-1 label, probability, latency."""
    from edge_agent.protocol import validate_name
    from toolkit.fleet import FleetError

    validate_name(device, "device id")  # before the broker is tried
    raw = [(path, load_image(path)) for path in images]  # a bad file stops before any sending
    config = settings(ctx, broker, fleet, key_file)
    client = connect(config)
    try:
        [target] = targets(client, config, [device])
        manifest = _served_manifest(client, target, timeout)
        model = ModelInput.from_manifest(manifest.get("input"), target)
        batch = np.stack([convert(image, path, model) for path, image in raw])
        started = time.perf_counter()
        reply = client.infer(target, batch, timeout=timeout)
        round_trip = (time.perf_counter() - started) * 1000.0
    finally:
        client.close()
    if not reply.get("ok"):
        raise FleetError(f"{target} could not run the batch: {reply.get('error')}")
    result = reply.get("result") or {}
    served = (result.get("model"), result.get("version"))
    if served != (manifest.get("model"), manifest.get("version")):
        err_console.print(
            f"[yellow]warning:[/] {literal(target)} switched to {literal(served[0])} "
            f"{literal(served[1])} during the request; the images were converted, and are "
            f"labelled, as {literal(manifest.get('model'))} {literal(manifest.get('version'))} "
            "takes them",
            soft_wrap=True,
        )
    logits = np.asarray(result.get("logits"), dtype=np.float64)
    if logits.ndim != 2 or len(logits) != len(raw):
        raise FleetError(f"{target} answered {logits.shape} logits for {len(raw)} images")
    probs = softmax(logits)
    latency = result.get("latency_ms")
    per_image = latency / len(raw) if isinstance(latency, int | float) else None
    rows = []
    for (path, _), p in zip(raw, probs, strict=True):
        index = int(p.argmax())
        rows.append(
            {
                "image": str(path),
                "class": index,
                "label": _label(manifest.get("labels"), index),
                "probability": float(p[index]),
            }
        )
    document = {
        "device": target,
        "model": result.get("model") or manifest.get("model"),
        "version": result.get("version") or manifest.get("version"),
        "latency_ms": latency,
        "latency_ms_per_image": per_image,
        "round_trip_ms": round_trip,
        "results": rows,
    }
    if as_json:
        print_json(document)
        return
    _print_infer(document)


def _print_infer(document: Mapping[str, Any]) -> None:
    table = Table(
        title=(
            f"{literal(document['device'])}: {literal(document['model'])} "
            f"{literal(document['version'])}"
        ),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("image", overflow="fold")
    table.add_column("label", no_wrap=True)
    table.add_column("probability", justify="right", no_wrap=True)
    table.add_column("latency", justify="right", no_wrap=True)
    per_image = document["latency_ms_per_image"]
    latency = "-" if per_image is None else f"{per_image:.2f} ms"
    for row in document["results"]:
        table.add_row(
            literal(row["image"]), literal(row["label"]), f"{row['probability']:.3f}", latency
        )
    batch = document["latency_ms"]
    on_device = "" if batch is None else f"{batch:.2f} ms on the device (latency: per image), "
    table.caption = (
        f"one batch of {len(document['results'])}: {on_device}"
        f"{document['round_trip_ms']:.0f} ms round trip"
    )
    console.print(table)
