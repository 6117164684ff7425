"""On-device gossip learning: one real node of the simulator, driven by the agent.

Importing this module imports torch, so the agent imports it only when learning is switched on
(``learn = true`` or the ``learn.start`` command); a device that only serves never pays for it.

A round is what :mod:`toolkit.simulate` does for one node: ``local_steps`` optimizer steps on
the local data (:mod:`models.training`, the simulator's own code; here every batch is drawn
afresh, ``BatchSampler.fresh``), a push of the model to ``peers`` online peers
(the agent sends it), then a merge of what peers pushed, once the
:class:`edge_agent.merge.Merger` buffer holds ``trigger`` models (the simulator's merge code
again), an evaluation on the local test split, and a checkpoint in the state directory.
The model starts from the last checkpoint when there is one (so SIGKILL or a power cut loses
at most one round), otherwise from an independent initialisation seeded by the device id: the
gossip case the variance-corrected merge exists for.

Local data lives in ``data_dir`` as safetensors files, ``train.safetensors`` and optionally
``test.safetensors``, each with ``x`` (float32, N x C x H x W, normalised as the model expects)
and ``y`` (int64 labels). Without a test file a fixed 20% of the training data is held out.
``train.safetensors`` may also hold ``label_probs`` (:data:`edge_agent.learning.LABEL_PROBS`):
then the device is a ``dirichlet-pool`` node, drawing every sample's label with those
probabilities (``BatchSampler.pooled``, as the simulator does) instead of uniform batches.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file

import models
from bitfleet.errors import BitfleetError
from edge_agent.config import LearnSettings
from edge_agent.learning import LABEL_PROBS
from edge_agent.merge import MergeError, Merger
from edge_agent.state import StateStore
from models import training

__all__ = ["Learner", "LocalData", "DataError", "load_local_data"]


class DataError(BitfleetError, ValueError):
    """The local data directory is missing or holds data the model cannot take."""


class LocalData:
    """A device's training and test arrays, and its label probabilities if it is a pool node."""

    def __init__(
        self,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        label_probs: np.ndarray | None = None,
    ) -> None:
        self.x_train = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
        self.y_train = torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64))
        self.x_test = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32))
        self.y_test = torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64))
        self.label_probs = None if label_probs is None else np.asarray(label_probs, np.float64)

    def __len__(self) -> int:
        return len(self.y_train)

    def batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[training.Batch]:
        """Training batches without end, drawn the way this device's data asks.

        With :attr:`label_probs` (a pool node) every sample's label is drawn with them
        (``BatchSampler.pooled``); without, every batch is drawn afresh (``BatchSampler.fresh``).
        """
        sampler = training.BatchSampler(self.x_train, self.y_train, batch_size)
        if self.label_probs is None:
            return sampler.fresh(rng)
        return sampler.pooled(self.label_probs, rng)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``x``, ``y`` and, if the file has them, the label probabilities of a pool node."""
    try:
        arrays = load_file(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise DataError(f"{path} is not a readable safetensors file ({err})") from None
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{path} must hold tensors 'x' (images) and 'y' (labels)")
    x, y = arrays["x"], arrays["y"]
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise DataError(f"{path}: x must be N x C x H x W and y N labels, got {x.shape}, {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: labels y must be integers, got {y.dtype}")
    return x, y, arrays.get(LABEL_PROBS)


def load_local_data(data_dir: str | Path) -> LocalData:
    """Read ``train.safetensors`` (and ``test.safetensors``) from ``data_dir``."""
    root = Path(data_dir)
    train_file = root / "train.safetensors"
    if not train_file.is_file():
        raise DataError(
            f"no training data: {train_file} does not exist (write x/y tensors with "
            "safetensors.numpy.save_file)"
        )
    x, y, probs = _read(train_file)
    test_file = root / "test.safetensors"
    if test_file.is_file():
        xt, yt, _ = _read(test_file)
        return _checked(LocalData(x, y, xt, yt, probs), train_file)
    order = np.random.default_rng(0).permutation(len(y))
    cut = max(1, len(y) // 5)
    held_out = LocalData(x[order[cut:]], y[order[cut:]], x[order[:cut]], y[order[:cut]], probs)
    return _checked(held_out, train_file)


def _checked(data: LocalData, path: Path) -> LocalData:
    """``data`` once a pool node's probabilities are valid and fit its labels.

    Drawing one batch runs ``BatchSampler.pooled``'s checks (finite, non-negative, not all
    zero, one per class, no probability for a class without samples) now, not on the
    learning thread.
    """
    try:
        next(data.batches(1, np.random.default_rng(0)))
    except ValueError as err:
        raise DataError(f"{path}: {err}") from None
    return data


def _device_seed(device: str) -> int:
    return int.from_bytes(hashlib.sha256(device.encode()).digest()[:4], "little")


class Learner:
    """The learning half of an agent: a torch model, its optimizer, data and merge buffer.

    Thread model: the agent's learning thread calls :meth:`train_round`, :meth:`merge` and
    :meth:`checkpoint`; the MQTT thread calls :meth:`receive` with peers' models. A lock
    guards the merge buffer, so a push can arrive at any moment.
    """

    def __init__(
        self,
        spec: Mapping[str, Any],
        data: LocalData,
        settings: LearnSettings,
        store: StateStore,
        device: str,
        origin: str | None = None,
        initial: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.settings = settings
        self.origin = origin
        self.store = store
        self.device = device
        self.data = data
        self.model_name = str(spec.get("name", "model"))
        self.round = 0
        self.metrics: dict[str, float] = {}
        torch.manual_seed(_device_seed(device))
        self.model = models.build(dict(spec))
        checkpoint = store.load_checkpoint()
        resumed = False
        if checkpoint is not None:
            tensors, meta = checkpoint
            # a checkpoint learned from another deployed artifact is stale: a new model
            # restarts learning (checkpoints written before origins were recorded resume)
            same_origin = meta.get("origin") in (None, origin)
            if meta.get("model") == self.model_name and same_origin and self._fits(tensors):
                training.load_numpy_state(self.model, tensors)
                self.round = int(meta.get("round", 0))
                self.metrics = dict(meta.get("metrics", {}))
                resumed = True
        if not resumed and initial is not None:
            if not self._fits(initial):
                raise DataError(
                    f"the deployed artifact's weights do not fit its network spec "
                    f"({self.model_name}); export it again with its weights"
                )
            training.load_numpy_state(self.model, initial)
        self._check_data()
        self.optimizer = training.make_optimizer(self.model, settings.optimizer, settings.lr, 0.0)
        self.expected = {k: (v.shape, v.dtype) for k, v in self.state().items()}
        self.binary_names = training.binary_weight_names(self.model)
        self._lock = threading.Lock()
        self._merger = Merger(
            method=settings.merge,
            self_weight=settings.self_weight,
            variance=settings.variance,
            rule=settings.vc_rule,
            trigger=settings.trigger,
            no_rescale=() if settings.rescale_binary else self.binary_names,
        )
        self._rng = np.random.default_rng(_device_seed(device) + self.round)
        self.merges = 0
        self.initial_accuracy = self.evaluate()  # where this run started (resumed or fresh)

    # ----------------------------------------------------------------------------- helpers
    def _check_data(self) -> None:
        try:
            self.model.eval()
            with torch.no_grad():
                out = self.model(self.data.x_train[:1])
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise DataError(
                f"the model cannot take the local data of shape "
                f"{tuple(self.data.x_train.shape[1:])}: {first}"
            ) from None
        finally:
            self.model.train()
        classes = out.shape[1]
        labels = torch.cat([self.data.y_train, self.data.y_test])  # evaluate takes a loss too
        if int(labels.max()) >= classes or int(labels.min()) < 0:
            raise DataError(f"labels must be in [0, {classes}) for this model")

    def _fits(self, tensors: Mapping[str, np.ndarray]) -> bool:
        own = self.model.state_dict()
        return set(own) == set(tensors) and all(
            tuple(own[k].shape) == tuple(tensors[k].shape) for k in own
        )

    def state(self) -> dict[str, np.ndarray]:
        """The model as name -> array (what is pushed, merged and checkpointed)."""
        return training.state_to_numpy(self.model)

    # ------------------------------------------------------------------------------ a round
    def train_round(self) -> dict[str, float]:
        """``local_steps`` optimizer steps, each on a mini-batch drawn from the local data."""
        batches = self.data.batches(self.settings.batch_size, self._rng)
        steps = itertools.islice(batches, self.settings.local_steps)
        return training.train_steps(self.model, self.optimizer, steps)

    def receive(self, sender: str, tensors: Mapping[str, np.ndarray], samples: float) -> None:
        """Buffer a peer's model (already verified by the protocol layer)."""
        with self._lock:
            self._merger.add(sender, dict(tensors), weight=max(float(samples), 1.0))

    @property
    def pending(self) -> int:
        with self._lock:
            return self._merger.pending

    def merge(self) -> bool:
        """Merge the buffered models if the trigger is reached; True if a merge happened."""
        with self._lock:
            if not self._merger.ready:
                return False
            try:
                merged = self._merger.merge_into(self.state())
            except MergeError:
                for sender in self._merger.senders:
                    self._merger.discard(sender)
                return False
        if merged is None:
            return False
        training.load_numpy_state(self.model, merged)
        self.merges += 1
        return True

    def evaluate(self) -> float:
        """Accuracy on the local test split."""
        return training.evaluate(self.model, self.data.x_test, self.data.y_test)["accuracy"]

    def finish_round(self, train_metrics: Mapping[str, float], merged: bool) -> dict[str, float]:
        """Evaluate, count the round and checkpoint (atomically) what was learned."""
        self.round += 1
        self.metrics = {
            "round": self.round,
            "accuracy": self.evaluate(),
            "train_loss": float(train_metrics.get("loss", float("nan"))),
            "merged": float(merged),
            "merges": float(self.merges),
        }
        self.checkpoint()
        return self.metrics

    def checkpoint(self) -> None:
        self.store.save_checkpoint(
            self.state(),
            {
                "round": self.round,
                "model": self.model_name,
                "origin": self.origin,
                "metrics": self.metrics,
                "saved_at": time.time(),
            },
        )

    def choose_peers(self, online: list[str]) -> list[str]:
        """Up to ``peers`` distinct peers, uniformly at random among ``online`` (self excluded)."""
        candidates = sorted(p for p in online if p != self.device)
        k = min(self.settings.peers, len(candidates))
        if k == 0:
            return []
        return [candidates[i] for i in self._rng.choice(len(candidates), size=k, replace=False)]
