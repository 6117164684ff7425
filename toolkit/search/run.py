"""One differentiable search run: data split, bi-level updates, cost penalty, checkpoints, outputs.

First-order DARTS on a binary supernet. The training images are split once (seeded) into two
halves: the *weights* learn on one (SGD or Adam, cosine schedule, binary latent weights clipped
after each step, through :func:`models.training.train_steps`), the *alphas* on the other (Adam,
lr 3e-4, betas (0.5, 0.999), weight decay 1e-3, DARTS's settings). Every step first moves the
alphas on a validation batch, then the weights on a training batch; the alphas' loss adds the
OPs penalty (:mod:`toolkit.search.cost`), so the architecture trades accuracy against the
distance to ``target_ops``. First order: the alphas' gradient takes the current weights as
fixed (DARTS's cheaper variant, which its authors found close to the second-order one).

Reproducibility: the supernet's initialisation is seeded by ``seed``, each epoch's batches by
``(seed, epoch)`` alone, and a checkpoint after every epoch holds everything that moves (weights,
alphas, both optimizers, the torch generator), so a resumed search ends where one that never
stopped ends.

Output directory::

    <out>/genotype.json            the derived genotype (models.nasb.Genotype.load reads it)
    <out>/alphas.png               mean architecture weight per operation over the epochs
    <out>/search.json              config, per-epoch history, the network's args and cost
    <out>/checkpoints/epoch_0003/  resumable state (see :mod:`toolkit.search.state`)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import models
from bitfleet.fsutil import atomic_write_json
from models.nasb import PRIMITIVES, Genotype
from models.nasb.network import DEFAULT_CHANNELS, DEFAULT_LAYERS, STEMS
from models.training import (
    OPTIMIZERS,
    BatchSampler,
    cosine_schedule,
    make_optimizer,
    train_steps,
)

from ..data import ArrayDataset, load_dataset
from ..progress import step_progress
from . import state
from .cost import CostTable, check_target, cost_table, derived_network, ops_penalty
from .plot import mean_weights, plot_alphas
from .supernet import Supernet

__all__ = ["SPACES", "SearchConfig", "SearchResult", "search", "split_halves", "COST_INPUT_SIZE"]

#: Search spaces ``search`` knows (one today: the NASB cell of :mod:`models.nasb`).
SPACES = ("nasb",)
#: Input side at which costs are counted and targets given (ImageNet's, as the papers report).
COST_INPUT_SIZE = 224
# settings a resumed search may change
_RESUMABLE = ("epochs", "threads")


@dataclass
class SearchConfig:
    """Everything that determines a search (saved in ``search.json`` and every checkpoint)."""

    space: str = "nasb"
    dataset: str = "digits-hard"
    data_root: str | None = None
    target_ops: float | None = None
    lam: float = 1.0
    epochs: int = 10
    cells: int = DEFAULT_LAYERS
    channels: int = DEFAULT_CHANNELS
    nodes: int = 4
    stem: str = "imagenet"
    primitives: list[str] = field(default_factory=lambda: list(PRIMITIVES))
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    arch_lr: float = 3e-4
    arch_weight_decay: float = 1e-3
    warmup_epochs: int = 0
    limit: int | None = None
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(
                f"unknown search space {self.space!r}; known spaces: {', '.join(SPACES)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}"
            )
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; use one of {', '.join(STEMS)}")
        for name in ("epochs", "cells", "nodes", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs must be >= 0 and below epochs ({self.epochs}), "
                f"got {self.warmup_epochs}: the alphas need at least one epoch"
            )
        if self.channels < 2:
            raise ValueError(f"channels must be >= 2, got {self.channels}")
        if self.target_ops is not None and not (
            math.isfinite(self.target_ops) and self.target_ops > 0
        ):
            raise ValueError(f"target_ops must be a positive number of OPs, got {self.target_ops}")
        for name in ("lam", "lr", "arch_lr", "weight_decay", "arch_weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.lr == 0 or self.arch_lr == 0:
            raise ValueError("lr and arch_lr must be > 0")
        if self.limit is not None and self.limit < 2:
            raise ValueError(
                f"limit must be >= 2 (half trains weights, half alphas), got {self.limit}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        self.primitives = list(self.primitives)


@dataclass
class SearchResult:
    """What a finished search reports."""

    genotype: Genotype
    ops: float
    target_ops: float | None
    network: dict[str, Any]
    history: list[dict[str, Any]]
    bounds: tuple[float, float]
    out: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "genotype": self.genotype.to_dict(),
            "ops": self.ops,
            "target_ops": self.target_ops,
            "input_size": COST_INPUT_SIZE,
            "network": self.network,
            "reachable_ops": list(self.bounds),
            "epochs": len(self.history),
            "history": self.history,
            "out": str(self.out) if self.out is not None else None,
        }


def _split(count: int, config: SearchConfig) -> tuple[np.ndarray, np.ndarray]:
    return split_halves(count, config.seed, config.limit)


def split_halves(count: int, seed: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A search's seeded halves of the (first ``limit`` shuffled) training images.

    The first half trains the weights, the second the alphas; a baseline that selects
    architectures on held-out images (random search) uses the same halves, so it sees exactly
    the data the search saw.
    """
    order = np.random.default_rng(seed).permutation(count)
    if limit is not None:
        order = order[:limit]
    if len(order) < 2:
        raise ValueError(f"the search needs at least 2 training images, got {len(order)}")
    half = len(order) // 2
    return np.sort(order[:half]), np.sort(order[half:])


@contextmanager
def _frozen(parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """No gradients for ``parameters`` inside (the alphas' step needs none for the weights)."""
    flags = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)


class _ArchStepper:
    """Moves the alphas one Adam step per validation batch and keeps the epoch's statistics."""

    def __init__(
        self,
        supernet: Supernet,
        optimizer: torch.optim.Optimizer,
        table: CostTable,
        target: float | None,
        lam: float,
    ) -> None:
        self.supernet, self.optimizer, self.table = supernet, optimizer, table
        self.target, self.lam, self.reach = target, lam, table.log_reach
        self.weights = [p for p in supernet.weight_modules().parameters()]
        self.reset()

    def reset(self) -> None:
        self.loss, self.penalty, self.correct, self.seen = 0.0, 0.0, 0, 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.supernet.train()
        with _frozen(self.weights):
            logits = self.supernet(x)
            loss = F.cross_entropy(logits, y)
            total = loss
            if self.target is not None:
                expected = self.table.expected(
                    self.supernet.alphas_normal, self.supernet.alphas_reduce
                )
                penalty = ops_penalty(expected, self.target, self.lam, self.reach)
                total = loss + penalty.to(loss.dtype)
                self.penalty += float(penalty.detach()) * len(y)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
        self.loss += float(loss.detach()) * len(y)
        self.correct += int((logits.detach().argmax(1) == y).sum())
        self.seen += len(y)

    def interleave(
        self,
        train: Iterator[tuple[torch.Tensor, torch.Tensor]],
        val: Iterator[tuple[torch.Tensor, torch.Tensor]],
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training batches, with an alpha step on a validation batch before each.

        :func:`models.training.train_steps` consumes this: it asks for a batch (the alphas
        move), then takes its weight step on it. Ends with the shorter of the two.
        """
        for batch, (xv, yv) in zip(train, val, strict=False):
            self.step(xv, yv)
            yield batch

    def summary(self) -> dict[str, float | None]:
        """The epoch's alpha-step statistics; None in a warm-up epoch, which took none."""
        if self.seen == 0:
            return {"val_loss": None, "val_accuracy": None, "penalty": None}
        return {
            "val_loss": self.loss / self.seen,
            "val_accuracy": self.correct / self.seen,
            "penalty": self.penalty / self.seen,
        }


def _snapshot(supernet: Supernet) -> dict[str, list[float]]:
    return {
        "normal": mean_weights(supernet.alphas_normal),
        "reduce": mean_weights(supernet.alphas_reduce),
    }


def _check_resume(saved: dict[str, Any], config: SearchConfig, path: Path) -> None:
    for key, value in asdict(config).items():
        if key not in _RESUMABLE and saved.get(key) != value:
            raise ValueError(
                f"cannot resume {path}: its search used {key}={saved.get(key)!r}, this one "
                f"{key}={value!r}; resume with the same settings (only --epochs may change)"
            )


def search(
    config: SearchConfig,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    train_data: ArrayDataset | None = None,
) -> SearchResult:
    """Search a cell for ``config``; write the output directory ``out`` if given.

    Everything that can be wrong with the input (space, dataset, an unreachable target, an
    ``out`` that is a file or already holds a search) is reported before the first step.
    """
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        if out_path.exists() and not out_path.is_dir():
            raise NotADirectoryError(f"{out_path} is a file, not a folder; choose another --out")
        if resume and state.latest(out_path) is None:
            raise FileNotFoundError(
                f"{out_path} holds no search checkpoint to resume; start a new search instead"
            )
        if not resume and state.latest(out_path) is not None:
            raise FileExistsError(
                f"{out_path} already holds a search; pass --resume to continue it or choose "
                "another --out"
            )
    elif resume:
        raise ValueError("resume needs the search directory (out) to resume from")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    data = (
        train_data
        if train_data is not None
        else load_dataset(config.dataset, "train", root=config.data_root)
    )
    weights_half, alphas_half = _split(len(data), config)

    torch.manual_seed(config.seed)
    supernet = Supernet(
        channels=config.channels,
        layers=config.cells,
        nodes=config.nodes,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        stem=config.stem,
        primitives=config.primitives,
    )
    table = cost_table(supernet, COST_INPUT_SIZE)
    if config.target_ops is not None:
        check_target(table, config.target_ops)

    weights_optimizer = make_optimizer(
        supernet.weight_modules(),
        config.optimizer,
        config.lr,
        config.momentum,
        config.weight_decay,
    )
    alphas_optimizer = torch.optim.Adam(
        supernet.arch_parameters(),
        lr=config.arch_lr,
        betas=(0.5, 0.999),
        weight_decay=config.arch_weight_decay,
    )
    history: list[dict[str, Any]] = []
    alpha_history = [_snapshot(supernet)]
    start = 0
    if resume:
        assert out_path is not None
        checkpoint = state.latest(out_path)
        assert checkpoint is not None
        saved = state.load_search(checkpoint, supernet, weights_optimizer, alphas_optimizer)
        _check_resume(saved.config, config, checkpoint)
        start, history, alpha_history = saved.epoch, saved.history, saved.alpha_history

    train_sampler = BatchSampler(data.x, data.y, config.batch_size, indices=weights_half)
    val_sampler = BatchSampler(data.x, data.y, config.batch_size, indices=alphas_half)
    steps = math.ceil(len(weights_half) / config.batch_size)
    stepper = _ArchStepper(supernet, alphas_optimizer, table, config.target_ops, config.lam)
    with _Progress(progress, config.epochs, steps) as bar:
        for epoch in range(start, config.epochs):
            bar.start_epoch(epoch)
            started = time.perf_counter()
            stepper.reset()
            warmup = epoch < config.warmup_epochs
            batches = train_sampler.epoch(config.seed, epoch)
            if not warmup:
                batches = stepper.interleave(batches, val_sampler.epoch(config.seed + 1, epoch))
            stats = train_steps(
                supernet,
                weights_optimizer,
                batches,
                lr_at=cosine_schedule(config.lr, epoch, config.epochs, steps),
                on_step=bar.step,
            )
            genotype = supernet.derive_genotype()
            with torch.no_grad():
                expected = float(table.expected(supernet.alphas_normal, supernet.alphas_reduce))
            record = {
                "epoch": epoch + 1,
                "warmup": warmup,
                "train_loss": stats["loss"],
                "train_accuracy": stats["accuracy"],
                **stepper.summary(),
                "expected_ops": expected,
                "derived_ops": table.of_genotype(genotype),
                "lr": weights_optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started,
                "genotype": genotype.to_dict(),
            }
            history.append(record)
            alpha_history.append(_snapshot(supernet))
            bar.end_epoch(record)
            if out_path is not None:
                state.save_search(
                    out_path,
                    supernet,
                    weights_optimizer,
                    alphas_optimizer,
                    config=asdict(config),
                    epoch=epoch + 1,
                    history=history,
                    alpha_history=alpha_history,
                )
                state.prune(out_path)

    genotype = supernet.derive_genotype()
    network = derived_network(supernet, genotype)
    ops = models.count_ops(network, (1, data.in_channels, COST_INPUT_SIZE, COST_INPUT_SIZE)).ops
    result = SearchResult(
        genotype=genotype,
        ops=ops,
        target_ops=config.target_ops,
        network=supernet.network_args(),
        history=history,
        bounds=table.bounds(),
        out=out_path,
    )
    if out_path is not None:
        genotype.save(out_path / "genotype.json")
        plot_alphas(alpha_history, supernet.primitives, out_path / "alphas.png")
        atomic_write_json(out_path / "search.json", {"config": asdict(config), **result.to_dict()})
    return result


class _Progress:
    """A rich progress bar per epoch, on stderr (stdout stays free for ``--json``)."""

    def __init__(self, enabled: bool, epochs: int, steps: int) -> None:
        self.enabled, self.epochs, self.steps = enabled, epochs, steps
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._progress = step_progress("search {task.description}", stderr=True, elapsed=True)
            self._progress.__enter__()
        return self

    def start_epoch(self, epoch: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(
                f"epoch {epoch + 1}/{self.epochs}", total=self.steps, status=""
            )

    def step(self, step: int, loss: float, batch: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, status=f"loss {loss:.3f}")

    def end_epoch(self, record: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=self.steps,
                status=(
                    "warm-up (alphas frozen)"
                    if record["warmup"]
                    else f"val acc {record['val_accuracy']:.3f}  derived "
                    f"{record['derived_ops'] / 1e6:.1f}M OPs"
                ),
            )

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
