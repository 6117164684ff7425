"""``export(model_or_checkpoint, out_dir, format=...)``: a trained network as an artifact.

The artifact is a directory with ``model.onnx`` and ``manifest.json`` (see
:mod:`exporters.artifact`), and with ``weights=True`` also ``weights.safetensors``: the network's
float training state (latent weights, batch-norm statistics), from which a device's on-device
learning starts. A packed artifact alone cannot give it back: binarising keeps only signs and
scales. It costs a float copy of the model (4 bytes a parameter), so it is off by default.

When given a checkpoint (a run directory), the input shape, labels and normalisation come from
its training metadata; for a bare module, pass them.

An ``input_shape`` must agree with what the network records: its channels always, its height
and width unless ``allow_resize=True`` and the network takes any size, which the spec tells: a
spec with an ``image_size`` (LeNet-5's flattening classifier) fixes it; one without (the
ResNets, global pooling before the classifier) does not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.numpy import save as safetensors_save
from torch import nn

import bitfleet
import models
from bitfleet.checkpoint import recorded_input_shape
from models import training
from models.checkpoint import load as load_checkpoint

from .artifact import MANIFEST_FILE, WEIGHTS_FILE, write_artifact
from .conventions import (
    CUSTOM_DOMAIN,
    FORMAT_FAST,
    FORMAT_TENSORRT,
    FORMAT_TFLITE,
    FORMAT_TRT,
    FORMATS,
)
from .float_parts import FLOAT_PARTS, quantize_float_weights
from .onnx_writer import ExportError, opset_of, to_onnx

__all__ = ["export"]


def export(
    model_or_checkpoint: nn.Module | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    format: str = FORMAT_FAST,  # noqa: A002 - the public API names it `format`
    *,
    name: str | None = None,
    version: str = "1",
    input_shape: tuple[int, int, int] | None = None,
    labels: list[str] | None = None,
    normalisation: dict[str, list[float]] | None = None,
    overwrite: bool = False,
    allow_resize: bool = False,
    weights: bool = False,
    float_parts: str = "fp32",
    binary_form: str = "auto",
) -> Path:
    """Export a model or checkpoint to an artifact directory; return its path.

    ``weights=True`` adds the float training state as ``weights.safetensors`` (see the module's
    doc), named by the manifest's ``weights_file``. ``float_parts="int8"`` stores the float
    convolutions' and dense layers' weights as per-channel int8 (:mod:`exporters.float_parts`).
    ``binary_form`` (``tflite`` only): ``auto``, ``int8`` or ``float``, the exact form of the
    binary layers (:mod:`exporters.tflite_binary`).

    Raises :class:`ExportError` for an ``input_shape`` the network cannot take or does not
    record (see the module's doc), and for an ``out_dir`` that is the checkpoint itself, holds
    it, or (with ``overwrite``) is something other than an artifact.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    if float_parts not in FLOAT_PARTS:
        raise ExportError(
            f"unknown float_parts {float_parts!r}; use one of {', '.join(FLOAT_PARTS)}"
        )
    if binary_form != "auto" and format != FORMAT_TFLITE:
        raise ExportError(
            f"binary_form applies to the tflite format only, not {format!r} (--binary-form "
            "goes with --format tflite)"
        )
    meta: dict[str, Any] = {}
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
        source = None
    else:
        checkpoint = load_checkpoint(model_or_checkpoint)
        model, meta = checkpoint.model, checkpoint.meta
        source = str(model_or_checkpoint)
        _check_out_dir(Path(out_dir), Path(model_or_checkpoint), overwrite)
    spec = models.spec_of(model)
    recorded = recorded_input_shape(spec, meta)
    if input_shape is None:
        shape = recorded
    else:
        shape = _checked_shape(input_shape, meta, spec, allow_resize)
    if shape is None:
        raise ExportError(
            "the input shape is unknown: pass input_shape=(C, H, W) (--input-shape C,H,W)"
        )
    _check_forward(model, shape, spec["name"])
    graph_format = FORMAT_TRT if format in (FORMAT_TENSORRT, FORMAT_TFLITE) else format
    proto = to_onnx(model.eval(), shape, graph_format)
    if float_parts == "int8":
        quantize_float_weights(proto)
    files: dict[str, bytes] = {}
    extra: dict[str, Any] = {}
    model_file = "model.onnx"
    # engines and flatbuffers are built before anything is written: no half artifact
    if format == FORMAT_TFLITE:
        from .tflite_writer import TFLITE_FILE, to_tflite

        files[TFLITE_FILE], extra["tflite"] = to_tflite(proto, binary_form)
        model_file = TFLITE_FILE
    else:
        files["model.onnx"] = proto.SerializeToString()
    if format == FORMAT_TENSORRT:
        from .tensorrt_engine import ENGINE_FILE, build_engine

        files[ENGINE_FILE], extra["tensorrt"] = build_engine(files["model.onnx"], shape)
        model_file = ENGINE_FILE
    custom_ops = sorted(
        {f"{n.domain}.{n.op_type}" for n in proto.graph.node if n.domain == CUSTOM_DOMAIN}
    )
    manifest = {
        "name": name or spec["name"],
        "version": str(version),
        "format": format,
        "model_file": model_file,
        "opset": None if format == FORMAT_TFLITE else opset_of(format),
        "custom_ops": custom_ops,
        "float_parts": float_parts,
        "input": {
            "name": "input",
            "shape": [None, *shape],
            "dtype": "float32",
            "layout": "NCHW",
            "normalisation": normalisation
            or ({"mean": meta["mean"], "std": meta["std"]} if "mean" in meta else None),
        },
        "output": {"name": "logits", "dtype": "float32"},
        "labels": labels or meta.get("classes"),
        "spec": spec,
        "source_checkpoint": source,
        "training": {k: meta[k] for k in ("dataset", "epoch", "metrics") if k in meta},
        "toolkit_version": bitfleet.version(),
    }
    manifest.update(extra)
    if weights:
        files[WEIGHTS_FILE] = safetensors_save(training.state_to_numpy(model))
        manifest["weights_file"] = WEIGHTS_FILE
    return write_artifact(out_dir, files, manifest, overwrite=overwrite)


def _checked_shape(
    shape: Any, meta: dict[str, Any], spec: dict[str, Any], allow_resize: bool
) -> tuple[int, int, int]:
    """``shape`` as (C, H, W) if the network takes it, else one-line ExportError."""
    try:
        values = tuple(int(v) for v in shape)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or min(values) < 1 or values != tuple(shape):
        raise ExportError(
            f"input_shape must be three positive integers (C, H, W), got {shape!r} "
            "(--input-shape C,H,W)"
        )
    c, h, w = values
    args = spec.get("args", {})
    channels = args.get("in_channels", meta.get("channels"))
    if channels is not None and c != int(channels):
        raise ExportError(
            f"{spec['name']} takes {channels}-channel input, not {c}: export it with "
            f"input_shape ({channels}, H, W) (--input-shape {channels},H,W)"
        )
    fixed = args.get("image_size")
    if fixed is not None and (h, w) != (int(fixed), int(fixed)):
        raise ExportError(
            f"{spec['name']} is built for {fixed}x{fixed} input (its spec fixes image_size), "
            f"not {h}x{w}: export it at ({c}, {fixed}, {fixed}) (--input-shape {c},{fixed},{fixed})"
        )
    size = meta.get("image_size")
    if size is not None and (h, w) != (int(size), int(size)) and not allow_resize:
        raise ExportError(
            f"the checkpoint records {size}x{size} input, not {h}x{w}; {spec['name']} takes any "
            "size, so pass allow_resize=True (--allow-resize) to export it at this one"
        )
    return (c, h, w)


def _check_forward(model: nn.Module, shape: tuple[int, int, int], name: str) -> None:
    """One forward pass at ``shape``: a network that cannot take it fails here, in one line."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *shape)))
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(f"{name} cannot take input of shape {shape}: {first}") from None
    finally:
        model.train(was_training)


def _check_out_dir(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse to write over the checkpoint being exported, or over what is not an artifact."""
    target, source = out.resolve(), checkpoint.resolve()
    if target == source or target in source.parents:
        raise ExportError(
            f"{out} is the checkpoint being exported (or holds it); choose another --out"
        )
    if overwrite and out.exists() and not (out / MANIFEST_FILE).is_file():
        raise ExportError(
            f"{out} exists and is not an artifact, so it is not replaced; choose another --out"
        )
