"""The checkpoint directory format, torch-free: safetensors files and a checksummed ``spec.json``.

Layout of a checkpoint directory::

    model.safetensors      weights (a module's state_dict), safetensors
    spec.json              {"format", "model": <model spec>, "meta": {...}, "files": {name: sha256}}
    optimizer.safetensors  optional: optimizer tensors, with its non-tensor state as JSON metadata

``spec.json`` is written last and names the SHA-256 of every other file, so it is the commit
point: a directory whose ``spec.json`` is missing or does not match its files is a torn write
(a crash mid-save) and :func:`verify` says so instead of letting half a model load. The spec
also carries the SHA-256 of its own content (``"sha256"``, over the canonical JSON of every
other key), because it decides what network the weights are loaded into: an edited quantizer or
width would otherwise load silently as a different model. Every file is written atomically
(temp file, fsync, rename).

This module knows files, not networks: :mod:`models.checkpoint` saves and rebuilds a torch
model through it, and torch-free code (a device, a script that lists runs) reads the spec and
the tensors as numpy arrays with :func:`read_spec_file` and :func:`load_tensors`. A training run
directory is itself a checkpoint: its final weights sit at its top level.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BitfleetError
from .fsutil import atomic_write_bytes, atomic_write_json, sha256_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FILE",
    "SPEC_FILE",
    "OPTIMIZER_FILE",
    "CheckpointError",
    "write",
    "is_checkpoint",
    "read_spec_file",
    "verify",
    "load_tensors",
    "recorded_input_shape",
    "safetensors_metadata",
    "seal",
]

CHECKPOINT_FORMAT = "bitfleet-checkpoint/2"
#: Read for compatibility: the same layout without the spec's own checksum.
LEGACY_FORMATS = ("bitfleet-checkpoint/1",)
MODEL_FILE = "model.safetensors"
SPEC_FILE = "spec.json"
OPTIMIZER_FILE = "optimizer.safetensors"


class CheckpointError(BitfleetError, ValueError):
    """A checkpoint that is missing, torn, of an unknown format, or does not match its spec."""


def write(
    directory: str | os.PathLike[str],
    files: Mapping[str, bytes],
    spec: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    remove: Iterable[str] = (),
) -> Path:
    """Write ``files`` atomically, delete the stale ``remove`` names, then commit ``spec.json``.

    ``meta`` is any JSON-able information (objects JSON cannot hold are stored as strings).
    Returns the directory.
    """
    path = Path(directory)
    for name in remove:
        (path / name).unlink(missing_ok=True)
    for name, data in files.items():
        atomic_write_bytes(path / name, data)
    document = {
        "format": CHECKPOINT_FORMAT,
        "model": dict(spec),
        "meta": json.loads(json.dumps(dict(meta), default=str)),
        "files": {name: sha256_file(path / name) for name in files},
    }
    atomic_write_json(path / SPEC_FILE, seal(document))
    return path


def _content_digest(document: Mapping[str, Any]) -> str:
    content = {k: v for k, v in document.items() if k != "sha256"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def seal(document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` with its ``"sha256"``: the digest of the canonical JSON of the rest.

    The digest does not depend on how the file is indented or its keys are ordered, only on
    what it says.
    """
    content = {k: v for k, v in document.items() if k != "sha256"}
    return {**content, "sha256": _content_digest(content)}


def is_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` looks like a checkpoint (has a spec.json and model.safetensors)."""
    path = Path(directory)
    return (path / SPEC_FILE).is_file() and (path / MODEL_FILE).is_file()


def read_spec_file(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a checkpoint's ``spec.json`` without loading any weights."""
    path = Path(directory)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; give a run directory or checkpoint"
        )
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory; give a run directory")
    spec_path = path / SPEC_FILE
    if not spec_path.is_file():
        raise CheckpointError(
            f"{path} has no {SPEC_FILE}: not a bitfleet checkpoint (or its save was interrupted)"
        )
    try:
        document = json.loads(spec_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{spec_path} is not valid JSON ({err}); the checkpoint is damaged"
        ) from None
    found = document.get("format") if isinstance(document, dict) else None
    if found not in (CHECKPOINT_FORMAT, *LEGACY_FORMATS):
        raise CheckpointError(
            f"{spec_path} has format {found!r}; this bitfleet reads {CHECKPOINT_FORMAT!r}"
        )
    if found == CHECKPOINT_FORMAT and document.get("sha256") != _content_digest(document):
        raise CheckpointError(
            f"{spec_path} does not match its own checksum: it was edited or damaged after the "
            "save; restore it or re-save the model"
        )
    return document


def verify(
    directory: str | os.PathLike[str], document: Mapping[str, Any], *, checksums: bool = True
) -> None:
    """Raise :class:`CheckpointError` unless the weights exist and every file matches its sum.

    ``checksums=False`` only checks that the weights file is there (a deliberate fast load).
    """
    path = Path(directory)
    if not (path / MODEL_FILE).is_file():
        raise CheckpointError(
            f"{path} has a spec but no {MODEL_FILE}; the checkpoint is incomplete"
        )
    if not checksums:
        return
    for name, expected in document.get("files", {}).items():
        file = path / name
        if not file.is_file() or sha256_file(file) != expected:
            raise CheckpointError(
                f"{file} does not match the checksum in {SPEC_FILE}: the checkpoint is torn "
                "or was modified; re-save it or use an earlier checkpoint"
            )


def load_tensors(
    directory: str | os.PathLike[str], *, check: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The weights as numpy arrays and the ``spec.json`` document, checksums verified first."""
    from safetensors.numpy import load as st_load

    path = Path(directory)
    document = read_spec_file(path)
    verify(path, document, checksums=check)
    return st_load((path / MODEL_FILE).read_bytes()), document


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of safetensors bytes, read from the header alone."""
    # The safetensors header: 8-byte little-endian length, then JSON with "__metadata__".
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    return header.get("__metadata__", {}) or {}


def recorded_input_shape(
    spec: Mapping[str, Any], meta: Mapping[str, Any]
) -> tuple[int, int, int] | None:
    """The (C, H, W) input a checkpoint records, or None where it records no channels or size.

    The model spec's ``in_channels`` / ``image_size`` arguments win (they fix the network);
    otherwise the training metadata's ``channels`` / ``image_size`` (the data it was trained
    on, which a ``quantized`` wrapper or a compressed student inherits).
    """
    args = spec.get("args", {})
    channels = args.get("in_channels", meta.get("channels"))
    size = args.get("image_size", meta.get("image_size"))
    if channels is None or size is None:
        return None
    return (int(channels), int(size), int(size))
