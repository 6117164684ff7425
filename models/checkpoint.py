"""Save a model to a checkpoint directory and rebuild it from one; never a pickle.

The directory format (``model.safetensors``, optional ``optimizer.safetensors``, and a
``spec.json`` that names the model spec, metadata and every file's SHA-256) is defined, torch-
free, in :mod:`bitfleet.checkpoint`; this module puts a torch model and its optimizer in and
out of it. The toolkit trains and resumes runs with it and the exporters read trained networks
with it; the device runtime never imports it.
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

from bitfleet.checkpoint import (
    CHECKPOINT_FORMAT,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SPEC_FILE,
    CheckpointError,
    is_checkpoint,
    read_spec_file,
    safetensors_metadata,
    write,
)
from bitfleet.checkpoint import (
    verify as verify_files_of,
)

from .registry import SpecError, UnknownModelError, build, spec_of

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "save",
    "load",
    "is_checkpoint",
    "optimizer_state_from_bytes",
    "optimizer_state_to_bytes",
    "read_spec_file",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "SPEC_FILE",
]


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
            optimizer_state_from_bytes((self.path / OPTIMIZER_FILE).read_bytes())
        )


def _state_bytes(model: nn.Module) -> bytes:
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return st_save(state, metadata={"format": CHECKPOINT_FORMAT})


def optimizer_state_to_bytes(optimizer: torch.optim.Optimizer) -> bytes:
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


def optimizer_state_from_bytes(data: bytes) -> dict[str, Any]:

    tensors = st_load(data)
    metadata = safetensors_metadata(data)
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in json.loads(metadata.get("scalars", "{}")).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": json.loads(metadata["param_groups"])}


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
    files = {MODEL_FILE: _state_bytes(model)}
    if optimizer is not None:
        files[OPTIMIZER_FILE] = optimizer_state_to_bytes(optimizer)
    stale = () if optimizer is not None else (OPTIMIZER_FILE,)
    return write(directory, files, spec_of(model), meta, remove=stale)


def load(directory: str | os.PathLike[str], *, verify: bool = True) -> Checkpoint:
    """Rebuild the model of a checkpoint directory and load its weights.

    Raises :class:`CheckpointError` with one line naming the problem when the directory is
    missing, torn (checksums differ), or its weights do not fit the architecture in its spec.
    """
    path = Path(directory)
    document = read_spec_file(path)
    verify_files_of(path, document, checksums=verify)
    try:
        model = build(document["model"])
    except (SpecError, UnknownModelError, ValueError, TypeError) as err:
        raise CheckpointError(f"cannot rebuild the model in {path / SPEC_FILE}: {err}") from None
    state = st_load((path / MODEL_FILE).read_bytes())
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
