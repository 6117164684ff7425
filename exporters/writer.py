"""``export(model_or_checkpoint, out_dir, format=...)``: a trained network as an artifact.

The artifact is a directory with ``model.onnx`` and ``manifest.json`` (see
:mod:`exporters.artifact`). When given a checkpoint (a run directory), the input shape,
labels and normalisation come from its training metadata; for a bare module, pass them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

import bitfleet
import models
from models.checkpoint import load as load_checkpoint

from .artifact import write_artifact
from .conventions import CUSTOM_DOMAIN, FORMAT_FAST, FORMATS
from .onnx_writer import OPSET, ExportError, to_onnx

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
) -> Path:
    """Export a model or checkpoint to an artifact directory; return its path."""
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    meta: dict[str, Any] = {}
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
        source = None
    else:
        checkpoint = load_checkpoint(model_or_checkpoint)
        model, meta = checkpoint.model, checkpoint.meta
        source = str(model_or_checkpoint)
    spec = models.spec_of(model)
    shape = input_shape or _shape_from(meta, spec)
    if shape is None:
        raise ExportError(
            "the input shape is unknown: pass input_shape=(C, H, W) (--input-shape C,H,W)"
        )
    proto = to_onnx(model.eval(), shape, format)
    custom_ops = sorted(
        {f"{n.domain}.{n.op_type}" for n in proto.graph.node if n.domain == CUSTOM_DOMAIN}
    )
    manifest = {
        "name": name or spec["name"],
        "version": str(version),
        "format": format,
        "model_file": "model.onnx",
        "opset": OPSET,
        "custom_ops": custom_ops,
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
    return write_artifact(
        out_dir, {"model.onnx": proto.SerializeToString()}, manifest, overwrite=overwrite
    )


def _shape_from(meta: dict[str, Any], spec: dict[str, Any]) -> tuple[int, int, int] | None:
    args = spec.get("args", {})
    channels = args.get("in_channels", meta.get("channels"))
    size = args.get("image_size", meta.get("image_size"))
    if channels is None or size is None:
        return None
    return (int(channels), int(size), int(size))
