"""One training loop for float and binary networks.

The loop is deliberately plain: in-memory arrays (every bundled dataset fits), one shuffled
pass per epoch, Adam or SGD, a cosine or constant learning-rate schedule, latent-weight
clipping after every optimizer step (Larq's ``weight_clip``), and optional knowledge distillation
from a teacher checkpoint (Hinton et al. 2015), as Bi-Real and Real-to-Binary training do.

Reproducibility: model initialisation is seeded by ``seed`` and each epoch's shuffle by
``(seed, epoch)`` alone, so an interrupted run resumed from its last checkpoint produces the same
weights as one that never stopped.

Run directory written by :func:`train` (itself a checkpoint, see :mod:`models.checkpoint`)::

    <out>/model.safetensors, spec.json   latest weights (the final ones once training ends)
    <out>/config.json                    the TrainConfig
    <out>/history.json                   per-epoch loss, accuracy, learning rate, images/s
    <out>/checkpoints/epoch_0003/        intermediate checkpoints with optimizer state

The steps, the batch sampling and the evaluation come from :mod:`models.training`, the local
training the gossip simulator and the edge agent run too; this module adds the run around them
(data, schedule, checkpoints, resume, progress).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import models
from bitfleet.errors import BitfleetError
from bitfleet.fsutil import atomic_write_json
from models import checkpoint, training
from models.training import OPTIMIZERS, BatchSampler, make_optimizer, train_steps

from .data import ArrayDataset, load_dataset
from .progress import step_progress

__all__ = [
    "TrainConfig",
    "TrainResult",
    "ShapeError",
    "train",
    "evaluate",
    "make_model",
    "check_input",
]

SCHEDULES = ("cosine", "constant")


class ShapeError(BitfleetError, ValueError):
    """Input data whose shape the model cannot take."""


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved as ``config.json`` in the run)."""

    model: str = "bireal18"
    model_args: dict[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    data_root: str | None = None
    channels: int | None = None
    image_size: int | None = None
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    threads: int | None = None
    teacher: str | None = None
    kd_alpha: float = 0.9
    kd_temperature: float = 4.0
    checkpoint_every: int = 1
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(choices)}")
        for name in ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass
class TrainResult:
    """What a finished run reports."""

    out: Path | None
    model: nn.Module
    history: list[dict[str, float]]

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def _factory_accepts(name: str) -> set[str]:
    return set(inspect.signature(models.model_entry(name).factory).parameters)


def make_model(name: str, data: ArrayDataset, **model_args: Any) -> nn.Module:
    """Create a registered model sized for ``data`` (classes, channels, image size).

    Explicit ``model_args`` win; the dataset only fills the arguments the factory takes and the
    caller left out.
    """
    accepted = _factory_accepts(name)
    derived = {
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
    }
    args = {k: v for k, v in derived.items() if k in accepted} | model_args
    model = models.create(name, **args)
    check_input(model, tuple(data.x.shape[1:]))
    return model


def check_input(model: nn.Module, sample_shape: tuple[int, ...]) -> None:
    """Raise :class:`ShapeError` (one clear line) if ``model`` cannot take inputs of that shape."""
    try:
        spec_args = models.spec_of(model)["args"]
    except models.SpecError:
        spec_args = {}
    channels = spec_args.get("in_channels")
    if channels is not None and sample_shape[0] != channels:
        raise ShapeError(
            f"the model takes {channels}-channel images but the data has {sample_shape[0]} "
            f"channel(s); pass --channels {channels} to convert the data"
        )
    size = spec_args.get("image_size")
    if size is not None and tuple(sample_shape[1:]) != (size, size):
        raise ShapeError(
            f"the model takes {size}x{size} images but the data is "
            f"{sample_shape[1]}x{sample_shape[2]}; pass --image-size {size}"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *sample_shape)))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ShapeError(
            f"the model cannot take inputs of shape {tuple(sample_shape)}: {first}"
        ) from None
    finally:
        model.train(was_training)


def _epoch_learning_rate(
    config: TrainConfig, epoch: int, steps_per_epoch: int
) -> Callable[[int], float]:
    """``lr_at(step)`` for the steps of ``epoch``."""
    if config.schedule == "constant":
        return lambda step: config.lr
    return training.cosine_schedule(config.lr, epoch, config.epochs, steps_per_epoch)


def evaluate(
    model: nn.Module,
    data: ArrayDataset,
    batch_size: int = 256,
    indices: np.ndarray | None = None,
) -> dict[str, float]:
    """Test loss and accuracy of ``model`` (in eval mode) on ``data`` or its ``indices``."""
    check_input(model, tuple(data.x.shape[1:]))
    x, y = data.x, data.y
    if indices is not None:
        x, y = x[np.asarray(indices)], y[np.asarray(indices)]
    return training.evaluate(model, x, y, batch_size)


def _load_data(config: TrainConfig, split: str) -> ArrayDataset:
    return load_dataset(
        config.dataset,
        split,
        root=config.data_root,
        channels=config.channels,
        image_size=config.image_size,
    )


def _checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("epoch_"))


def latest_checkpoint(out: str | os.PathLike[str]) -> Path | None:
    """The newest complete intermediate checkpoint of a run directory, if any."""
    for path in reversed(_checkpoint_dirs(Path(out))):
        if checkpoint.is_checkpoint(path) and (path / checkpoint.OPTIMIZER_FILE).is_file():
            return path
    return None


def _data_meta(data: ArrayDataset, config: TrainConfig) -> dict[str, Any]:
    return {
        "dataset": config.dataset,
        "data_root": config.data_root,
        "channels": data.in_channels,
        "image_size": data.image_size,
        "classes": list(data.classes),
        "mean": list(data.mean),
        "std": list(data.std),
    }


def train(
    config: TrainConfig,
    out: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    train_data: ArrayDataset | None = None,
    test_data: ArrayDataset | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.dataset``; write a run directory to ``out`` if given.

    With ``resume=True`` and an ``out`` holding intermediate checkpoints, training continues
    from the newest one (same config required) and ends with the same weights as an
    uninterrupted run.
    """
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise NotADirectoryError(f"{out} is a file, not a run directory; choose another --out")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    train_data = train_data if train_data is not None else _load_data(config, "train")
    test_data = test_data if test_data is not None else _load_data(config, "test")
    out_path = Path(out) if out is not None else None

    torch.manual_seed(config.seed)
    model = make_model(config.model, train_data, **config.model_args)
    optimizer = make_optimizer(
        model, config.optimizer, config.lr, config.momentum, config.weight_decay
    )
    teacher = _load_teacher(config.teacher, train_data) if config.teacher else None

    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume:
        if out_path is None:
            raise ValueError("resume needs the run directory (out) to resume from")
        start_epoch, history = _resume(out_path, config, model, optimizer)
    elif out_path is not None and (out_path / checkpoint.SPEC_FILE).exists():
        raise FileExistsError(
            f"{out_path} already holds a run; pass --resume to continue it or choose another --out"
        )
    if out_path is not None:
        atomic_write_json(out_path / "config.json", asdict(config))

    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    sampler = BatchSampler(train_data.x, train_data.y, config.batch_size)
    meta = _data_meta(train_data, config)
    with _Progress(progress, config.epochs, steps_per_epoch, start_epoch) as bar:
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            stats = train_steps(
                model,
                optimizer,
                sampler.epoch(config.seed, epoch),
                teacher=teacher,
                kd_alpha=config.kd_alpha,
                kd_temperature=config.kd_temperature,
                lr_at=_epoch_learning_rate(config, epoch, steps_per_epoch),
                on_step=bar.step,
            )
            seconds = time.perf_counter() - started
            test = evaluate(model, test_data)
            record = {
                "epoch": epoch + 1,
                "train_loss": stats["loss"],
                "train_accuracy": stats["accuracy"],
                "test_loss": test["loss"],
                "test_accuracy": test["accuracy"],
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": seconds,
                "images_per_s": stats["samples"] / seconds,
            }
            history.append(record)
            bar.epoch_done(record)
            if out_path is not None:
                _save_epoch(out_path, config, model, optimizer, history, meta, epoch)
    return TrainResult(out=out_path, model=model, history=history)


def _load_teacher(path: str, data: ArrayDataset) -> nn.Module:
    teacher = checkpoint.load(path).model
    check_input(teacher, tuple(data.x.shape[1:]))
    return training.freeze(teacher)


def _save_epoch(
    out: Path,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    history: list[dict[str, float]],
    meta: dict[str, Any],
    epoch: int,
) -> None:
    done = epoch + 1
    info = meta | {"epoch": done, "epochs": config.epochs, "metrics": history[-1]}
    last = done == config.epochs
    if done % config.checkpoint_every == 0 or last:
        ckpt_dir = out / "checkpoints" / f"epoch_{done:04d}"
        checkpoint.save(model, ckpt_dir, optimizer=optimizer, history=history, **info)
        for old in _checkpoint_dirs(out)[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    atomic_write_json(out / "history.json", history)
    checkpoint.save(model, out, complete=last, **info)


def _resume(
    out: Path, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, list[dict[str, float]]]:
    saved_config = out / "config.json"
    if saved_config.is_file():
        previous = json.loads(saved_config.read_text())
        differs = {
            k: (previous.get(k), v)
            for k, v in asdict(config).items()
            if k not in ("epochs", "threads") and previous.get(k) != v
        }
        if differs:
            key, (old, new) = next(iter(differs.items()))
            raise ValueError(
                f"cannot resume {out}: its run used {key}={old!r}, this one {key}={new!r}; "
                "resume with the same settings (only --epochs and --threads may change)"
            )
    path = latest_checkpoint(out)
    if path is None:
        raise checkpoint.CheckpointError(
            f"{out} has no intermediate checkpoint to resume from; start a new run instead"
        )
    saved = checkpoint.load(path)
    model.load_state_dict(saved.model.state_dict())
    saved.load_optimizer_state(optimizer)
    return int(saved.meta["epoch"]), list(saved.meta.get("history", []))


class _Progress:
    """A rich progress bar over all training steps, or nothing when disabled."""

    def __init__(self, enabled: bool, epochs: int, steps_per_epoch: int, start_epoch: int) -> None:
        self.enabled = enabled
        self.total = epochs * steps_per_epoch
        self.completed = start_epoch * steps_per_epoch
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._progress = step_progress("train")
            self._progress.__enter__()
            self._task = self._progress.add_task(
                "train", total=self.total, completed=self.completed, status=""
            )
        return self

    def step(self, step: int, loss: float, batch: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, status=f"loss {loss:.3f}")

    def epoch_done(self, record: dict[str, float]) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task,
                status=f"epoch {record['epoch']:.0f}  test acc {record['test_accuracy']:.3f}",
            )

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
