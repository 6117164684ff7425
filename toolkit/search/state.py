"""A search's resumable checkpoint: supernet weights and alphas, both optimizers, epoch, RNG.

One checkpoint directory per finished epoch (``<out>/checkpoints/epoch_0003/``), in the
checkpoint format of :mod:`bitfleet.checkpoint` (safetensors files, a checksummed ``spec.json``
written last as the commit point; never a pickle)::

    model.safetensors              the supernet's state_dict (weights, BN statistics, alphas)
    weights_optimizer.safetensors  the weight optimizer (SGD or Adam)
    alphas_optimizer.safetensors   the alphas' Adam
    rng.safetensors                torch's CPU generator state
    spec.json                      {"model": {"name": "nasb-supernet", "args": <SearchConfig>},
                                    "meta": {"epoch", "history", "alpha_history"}, checksums}

The optimizer files use :mod:`models.checkpoint`'s encoding (tensors as safetensors, the rest as
JSON metadata), so one encoding of optimizer state serves training runs and searches.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from bitfleet import checkpoint as files
from bitfleet.checkpoint import MODEL_FILE, CheckpointError
from models.checkpoint import optimizer_state_from_bytes, optimizer_state_to_bytes

__all__ = ["SUPERNET_NAME", "SavedSearch", "save_search", "load_search", "latest", "prune"]

SUPERNET_NAME = "nasb-supernet"
WEIGHTS_OPTIMIZER_FILE = "weights_optimizer.safetensors"
ALPHAS_OPTIMIZER_FILE = "alphas_optimizer.safetensors"
RNG_FILE = "rng.safetensors"
_FILES = (MODEL_FILE, WEIGHTS_OPTIMIZER_FILE, ALPHAS_OPTIMIZER_FILE, RNG_FILE)


@dataclass
class SavedSearch:
    """What a search checkpoint restores besides the tensors: where, and the run so far."""

    path: Path
    config: dict[str, Any]
    epoch: int
    history: list[dict[str, Any]]
    alpha_history: list[dict[str, list[float]]]


def _epoch_dir(out: Path, epoch: int) -> Path:
    return out / "checkpoints" / f"epoch_{epoch:04d}"


def save_search(
    out: str | os.PathLike[str],
    supernet: nn.Module,
    weights_optimizer: torch.optim.Optimizer,
    alphas_optimizer: torch.optim.Optimizer,
    *,
    config: Mapping[str, Any],
    epoch: int,
    history: list[dict[str, Any]],
    alpha_history: list[dict[str, list[float]]],
) -> Path:
    """Write the checkpoint of ``epoch`` (epochs done) under ``out/checkpoints``; return it."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in supernet.state_dict().items()}
    blobs = {
        MODEL_FILE: st_save(state, metadata={"format": files.CHECKPOINT_FORMAT}),
        WEIGHTS_OPTIMIZER_FILE: optimizer_state_to_bytes(weights_optimizer),
        ALPHAS_OPTIMIZER_FILE: optimizer_state_to_bytes(alphas_optimizer),
        RNG_FILE: st_save({"torch": torch.get_rng_state()}),
    }
    meta = {"epoch": epoch, "history": history, "alpha_history": alpha_history}
    spec = {"name": SUPERNET_NAME, "args": dict(config)}
    return files.write(_epoch_dir(Path(out), epoch), blobs, spec, meta)


def latest(out: str | os.PathLike[str]) -> Path | None:
    """The newest complete search checkpoint under ``out/checkpoints``, if any."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return None
    for path in sorted(root.glob("epoch_*"), reverse=True):
        if files.is_checkpoint(path) and all((path / name).is_file() for name in _FILES):
            return path
    return None


def prune(out: str | os.PathLike[str], keep: int = 2) -> None:
    """Delete all but the ``keep`` newest epoch checkpoints."""
    root = Path(out) / "checkpoints"
    for old in sorted(root.glob("epoch_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_search(
    path: str | os.PathLike[str],
    supernet: nn.Module,
    weights_optimizer: torch.optim.Optimizer,
    alphas_optimizer: torch.optim.Optimizer,
) -> SavedSearch:
    """Load a checkpoint into the supernet and optimizers, restore the RNG; return the rest.

    Checksums are verified first; a checkpoint of another supernet (other shapes or names)
    is one :class:`CheckpointError` line.
    """
    where = Path(path)
    document = files.read_spec_file(where)
    files.verify(where, document)
    model = document.get("model", {})
    if model.get("name") != SUPERNET_NAME:
        raise CheckpointError(
            f"{where} is not a search checkpoint (it holds {model.get('name')!r})"
        )
    state = st_load((where / MODEL_FILE).read_bytes())
    expected = supernet.state_dict()
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        raise CheckpointError(
            f"{where} holds another supernet (different tensors); resume with the settings it "
            "was made with"
        )
    supernet.load_state_dict(state)
    weights_optimizer.load_state_dict(
        optimizer_state_from_bytes((where / WEIGHTS_OPTIMIZER_FILE).read_bytes())
    )
    alphas_optimizer.load_state_dict(
        optimizer_state_from_bytes((where / ALPHAS_OPTIMIZER_FILE).read_bytes())
    )
    torch.set_rng_state(st_load((where / RNG_FILE).read_bytes())["torch"])
    meta = document.get("meta", {})
    return SavedSearch(
        path=where,
        config=dict(model.get("args", {})),
        epoch=int(meta["epoch"]),
        history=list(meta.get("history", [])),
        alpha_history=list(meta.get("alpha_history", [])),
    )
