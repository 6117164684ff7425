"""Local training steps shared by the trainer, the gossip simulator and the edge agent.

The laptop's trainer (:mod:`toolkit.train`), the gossip simulator (:mod:`toolkit.simulate`) and
the device agent's learner (:mod:`edge_agent.learner`) must train the same way, or the
simulator's figures say nothing about the fleet. The layering (DESIGN.md section 1) lets the
agent import ``models`` but never ``toolkit``, so the shared step lives here: an optimizer
factory, the distillation loss and :func:`train_steps`, which runs one optimizer step per batch
and clips binary layers' latent weights after each, as Larq's ``weight_clip`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .constraints import clip_latent_weights, latent_weight_parameters

__all__ = [
    "OPTIMIZERS",
    "make_optimizer",
    "distillation_loss",
    "train_steps",
    "accuracy",
    "binary_weight_names",
]

OPTIMIZERS = ("adam", "sgd")


def make_optimizer(
    model: nn.Module,
    name: str = "adam",
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Adam or SGD over the model's parameters.

    Weight decay is applied to float parameters only: decaying binary layers' latent weights
    pulls them toward zero, where their sign flips on noise (Bi-Real and Larq train them
    without decay).
    """
    latent = {id(p) for p, _ in latent_weight_parameters(model)}
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if id(p) not in latent], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in latent], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, fused=True)
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """Hinton et al.'s loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""
    hard = F.cross_entropy(student_logits, labels)
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature * temperature * soft + (1.0 - alpha) * hard


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_iter: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.9,
    kd_temperature: float = 4.0,
    lr_at: Callable[[int], float] | None = None,
    on_step: Callable[[int, float, int], None] | None = None,
) -> dict[str, float]:
    """Run one optimizer step per batch of ``data_iter``; return mean loss and train accuracy.

    Latent weights of binary layers are clipped after every step. ``lr_at(step)`` sets the
    learning rate before each step; ``on_step(step, loss, batch_size)`` reports progress.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for step, (x, y) in enumerate(data_iter):
        if lr_at is not None:
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
        logits = model(x)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = distillation_loss(logits, teacher_logits, y, kd_alpha, kd_temperature)
        else:
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clip_latent_weights(model)
        value = float(loss.detach())
        total_loss += value * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
        if on_step is not None:
            on_step(step, value, len(y))
    if seen == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "samples": 0}
    return {"loss": total_loss / seen, "accuracy": correct / seen, "samples": seen}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` in eval mode (restoring its mode afterwards)."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(xb).argmax(1) == yb).sum())
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
    )
    model.train(was_training)
    return correct / max(len(y), 1)


def binary_weight_names(model: nn.Module) -> tuple[str, ...]:
    """State-dict names of the binary layers' latent weights (modules with ``is_binary``).

    Gossip sends these as 1 bit + scale (the ``sign`` codec) and may leave them out of
    variance correction; simulator and agent must agree on the list.
    """
    return tuple(
        f"{name}.weight" for name, m in model.named_modules() if getattr(m, "is_binary", False)
    )
