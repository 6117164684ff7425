"""Checkpoints: a directory with ``model.safetensors`` and ``spec.json``, never a pickle.

Layout of a checkpoint directory::

    model.safetensors      weights (the module's state_dict), safetensors
    spec.json              {"format", "model": <model spec>, "meta": {...}, "files": {name: sha256}}
    optimizer.safetensors  optional: optimizer tensors, with its non-tensor state as JSON metadata

``spec.json`` is written last and names the SHA-256 of every other file, so it is the commit
point: a directory whose ``spec.json`` is missing or does not match its files is a torn write
(a crash mid-save) and :func:`load` says so instead of loading half a model. Every file is
written atomically (temp file, fsync, rename).

A training run directory is itself a checkpoint: its final weights sit at its top level.

This module lives in ``exporters`` because both sides read checkpoints: the toolkit writes and
resumes them (``toolkit.checkpoint`` re-exports this API) and the ONNX writer exports them, and
the layering lets toolkit import exporters but not the reverse. It needs torch; the device
runtime never imports it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import models

from .fsutil import atomic_write_bytes, atomic_write_json, sha256_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "save",
    "load",
    "is_checkpoint",
    "read_spec_file",
]

CHECKPOINT_FORMAT = "bitfleet-checkpoint/1"
MODEL_FILE = "model.safetensors"
SPEC_FILE = "spec.json"
OPTIMIZER_FILE = "optimizer.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, torn, of an unknown format, or does not match its spec."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model plus what was saved beside it."""

    path: Path
    model: nn.Module
    spec: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_optimizer(self) -> bool:
        return (self.path / OPTIMIZER_FILE).is_file()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore an optimizer saved with the checkpoint (for resuming training)."""
        if not self.has_optimizer:
            raise CheckpointError(f"checkpoint {self.path} holds no optimizer state to resume from")
        optimizer.load_state_dict(
            _optimizer_state_from_bytes((self.path / OPTIMIZER_FILE).read_bytes())
        )


def _state_bytes(model: nn.Module) -> bytes:
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return st_save(state, metadata={"format": CHECKPOINT_FORMAT})


def _optimizer_state_to_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    """Flatten an optimizer state_dict: tensors to safetensors, everything else to JSON metadata."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "param_groups": json.dumps(state_dict["param_groups"]),
        "scalars": json.dumps(scalars),
    }
    return st_save(tensors, metadata=metadata)


def _optimizer_state_from_bytes(data: bytes) -> dict[str, Any]:

    tensors = st_load(data)
    metadata = _safetensors_metadata(data)
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in json.loads(metadata.get("scalars", "{}")).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": json.loads(metadata["param_groups"])}


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # The safetensors header: 8-byte little-endian length, then JSON with "__metadata__".
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    return header.get("__metadata__", {}) or {}


def save(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    **meta: Any,
) -> Path:
    """Save ``model`` (built by ``models.create``) and optional optimizer state to ``directory``.

    ``meta`` is any JSON-able information to keep beside the weights (dataset, epoch, metrics,
    normalisation...). Returns the directory.
    """
    path = Path(directory)
    spec = models.spec_of(model)
    files = {MODEL_FILE: _state_bytes(model)}
    if optimizer is not None:
        files[OPTIMIZER_FILE] = _optimizer_state_to_bytes(optimizer)
    else:
        (path / OPTIMIZER_FILE).unlink(missing_ok=True)
    for name, data in files.items():
        atomic_write_bytes(path / name, data)
    document = {
        "format": CHECKPOINT_FORMAT,
        "model": spec,
        "meta": json.loads(json.dumps(meta, default=str)),
        "files": {name: sha256_file(path / name) for name in files},
    }
    atomic_write_json(path / SPEC_FILE, document)
    return path


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
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        found = document.get("format") if isinstance(document, dict) else None
        raise CheckpointError(
            f"{spec_path} has format {found!r}; this bitfleet reads {CHECKPOINT_FORMAT!r}"
        )
    return document


def load(directory: str | os.PathLike[str], *, verify: bool = True) -> Checkpoint:
    """Rebuild the model of a checkpoint directory and load its weights.

    Raises :class:`CheckpointError` with one line naming the problem when the directory is
    missing, torn (checksums differ), or its weights do not fit the architecture in its spec.
    """
    path = Path(directory)
    document = read_spec_file(path)
    model_path = path / MODEL_FILE
    if not model_path.is_file():
        raise CheckpointError(
            f"{path} has a spec but no {MODEL_FILE}; the checkpoint is incomplete"
        )
    if verify:
        for name, expected in document.get("files", {}).items():
            file = path / name
            if not file.is_file() or sha256_file(file) != expected:
                raise CheckpointError(
                    f"{file} does not match the checksum in {SPEC_FILE}: the checkpoint is torn "
                    "or was modified; re-save it or use an earlier checkpoint"
                )
    try:
        model = models.build(document["model"])
    except (models.SpecError, models.UnknownModelError, ValueError, TypeError) as err:
        raise CheckpointError(f"cannot rebuild the model in {path / SPEC_FILE}: {err}") from None
    state = st_load(model_path.read_bytes())
    _load_state_strict(model, state, path)
    model.eval()
    return Checkpoint(path=path, model=model, spec=document["model"], meta=document.get("meta", {}))


def _load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} in the file, "
                f"{tuple(expected[k].shape)} in the spec)"
            )
        raise CheckpointError(
            f"the weights in {path / MODEL_FILE} do not match the architecture in its "
            f"{SPEC_FILE}: {'; '.join(parts)}. Was spec.json edited or copied from another run?"
        )
    model.load_state_dict(state)
