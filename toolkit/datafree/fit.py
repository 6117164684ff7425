"""Fitting synthetic data to a frozen teacher: a generator (GDFQ, AutoReCon) or a batch (ZeroQ).

:func:`fit_generator` is one loop for three jobs. It trains a generator's weights with the
reconstruction loss (:func:`toolkit.datafree.generators.reconstruction_loss`) on freshly
sampled batches; given architecture parameters too, every step also moves them with their own
Adam (DARTS's optimiser and learning rate), from the same batch's gradient. DARTS alternates
the two on the training and validation halves so that the weights cannot overfit the data the
alphas are judged on; a generator never sees the same batch twice, so one fresh batch serves
both, and the search costs one teacher pass per step instead of two. GDFQ's generator,
AutoReCon's supernet and the derived generator's retraining all run through it.

:func:`fit_inputs` is ZeroQ's "distilled data": a batch of images started from Gaussian noise
and optimised directly for the batch-norm statistics loss, no generator and no labels (the
teacher labels the result).

The teacher stays in eval mode throughout (:func:`models.training.freeze`): its batch norms
normalise with their running statistics, and the hooks of
:class:`~toolkit.datafree.bn_stats.BNStatistics` compare each layer's batch statistics with
them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bn_stats import BNStatistics
from .generators import ConditionalGenerator, reconstruction_loss

__all__ = ["FitStats", "fit_generator", "fit_inputs"]

#: ``on_step(step, loss)`` reports progress.
OnStep = Callable[[int, float], None]


@dataclass
class FitStats:
    """How a fit went: the loss of every weight step and the teacher's agreement at the end."""

    losses: list[float]
    accuracy: float

    @property
    def first(self) -> float:
        return sum(self.losses[:10]) / max(1, len(self.losses[:10]))

    @property
    def last(self) -> float:
        return sum(self.losses[-10:]) / max(1, len(self.losses[-10:]))


def _loss(
    teacher: nn.Module,
    bns: BNStatistics | None,
    images: Tensor,
    labels: Tensor,
    bn_weight: float,
) -> tuple[Tensor, Tensor]:
    logits = teacher(images)
    return reconstruction_loss(logits, labels, bns.loss() if bns else None, bn_weight), logits


def fit_generator(
    generator: ConditionalGenerator,
    teacher: nn.Module,
    steps: int,
    *,
    batch_size: int = 64,
    lr: float = 1e-3,
    bn_weight: float = 0.1,
    use_bn: bool = True,
    arch_parameters: Sequence[nn.Parameter] = (),
    arch_lr: float = 3e-4,
    seed: int = 0,
    on_step: OnStep | None = None,
) -> FitStats:
    """Train ``generator`` against ``teacher`` for ``steps`` weight steps (see the module doc).

    Args:
        generator: the generator to train (its parameters other than ``arch_parameters``).
        teacher: the frozen float network (see :func:`freeze`).
        steps: optimiser steps (weights, and alphas when given).
        batch_size: images per step.
        lr: Adam learning rate of the weights (betas 0.5, 0.999 as GDFQ's generator).
        bn_weight: weight of the batch-norm statistics loss (GDFQ: 0.1).
        use_bn: False for a teacher without batch norm: cross-entropy alone.
        arch_parameters: the alphas of a generator supernet, or nothing.
        arch_lr: Adam learning rate of the alphas (DARTS: 3e-4, weight decay 1e-3).
        seed: seeds the noise and labels of every batch.
        on_step: progress callback.
    """
    if steps < 1 or batch_size < 2:
        raise ValueError(f"fitting needs steps >= 1 and batch_size >= 2, got {steps}, {batch_size}")
    arch = list(arch_parameters)
    arch_ids = {id(p) for p in arch}
    weights = [p for p in generator.parameters() if id(p) not in arch_ids]
    optimizer = torch.optim.Adam(weights, lr=lr, betas=(0.5, 0.999))
    arch_optimizer = (
        torch.optim.Adam(arch, lr=arch_lr, betas=(0.5, 0.999), weight_decay=1e-3) if arch else None
    )
    rng = torch.Generator().manual_seed(seed)
    generator.train()
    losses: list[float] = []
    correct = seen = 0
    bns = BNStatistics(teacher) if use_bn else None
    try:
        if bns is not None:
            bns.attach()
        for step in range(steps):
            images, labels = generator.sample(batch_size, rng)
            loss, logits = _loss(teacher, bns, images, labels, bn_weight)
            optimizer.zero_grad(set_to_none=True)
            if arch_optimizer is not None:
                arch_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if arch_optimizer is not None:
                arch_optimizer.step()
            value = float(loss.detach())
            losses.append(value)
            if step >= steps - 10:
                correct += int((logits.detach().argmax(1) == labels).sum())
                seen += len(labels)
            if on_step is not None:
                on_step(step, value)
    finally:
        if bns is not None:
            bns.detach()
    return FitStats(losses=losses, accuracy=correct / max(1, seen))


def fit_inputs(
    teacher: nn.Module,
    shape: tuple[int, ...],
    steps: int,
    *,
    lr: float = 0.1,
    seed: int = 0,
    on_step: OnStep | None = None,
) -> tuple[Tensor, FitStats]:
    """ZeroQ's distilled data: a batch of ``shape`` (N, C, H, W) optimised for the BN loss.

    Returns the images (detached) and the fit's losses. Raises
    :class:`~toolkit.datafree.bn_stats.NoBatchNormError` for a teacher without batch norm:
    the loss has nothing else to fit.
    """
    if steps < 1 or shape[0] < 2:
        raise ValueError(f"fitting needs steps >= 1 and a batch of >= 2, got {steps}, {shape}")
    rng = torch.Generator().manual_seed(seed)
    images = torch.randn(shape, generator=rng).requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=lr)
    losses: list[float] = []
    with BNStatistics(teacher) as bns:
        for step in range(steps):
            teacher(images)
            loss = bns.loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    return images.detach(), FitStats(losses=losses, accuracy=float("nan"))
