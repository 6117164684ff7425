"""Local training, shared by the trainer, the gossip simulator and the edge agent.

The laptop's trainer (:mod:`toolkit.train`), the gossip simulator (:mod:`toolkit.simulate`) and
the device agent's learner (:mod:`edge_agent.learner`) must train the same way, or the
simulator's figures say nothing about the fleet. The layering (docs/design.md, section 1) lets the
agent import ``models`` but never ``toolkit``, so local training lives here, in one place:

- steps: :func:`make_optimizer`, :func:`distillation_loss` and :func:`train_steps`, which runs
  one optimizer step per batch and clips binary layers' latent weights after each, as Larq's
  ``weight_clip`` does;
- batch sampling, :class:`BatchSampler`, in four orders: :meth:`~BatchSampler.epoch` (one
  shuffled pass, seeded by ``(seed, epoch)``: the trainer), :meth:`~BatchSampler.endless`
  (passes reshuffled without end: the simulator), :meth:`~BatchSampler.fresh` (every batch
  drawn afresh: the agent) and :meth:`~BatchSampler.pooled` (every sample's label drawn with a
  node's label probabilities: a ``dirichlet-pool`` node, simulated or real);
- :func:`evaluate`: accuracy and loss in eval mode;
- :func:`state_to_numpy` and :func:`load_numpy_state`: the ``name -> numpy array`` form in
  which models are merged, sent and checkpointed;
- :func:`binary_weight_names`: the tensors gossip sends as 1 bit + scale.

Averaging models is not training: it lives in :mod:`edge_agent.merge`, which needs no torch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .constraints import clip_latent_weights, latent_weight_parameters

__all__ = [
    "OPTIMIZERS",
    "make_optimizer",
    "distillation_loss",
    "freeze",
    "train_steps",
    "BatchSampler",
    "evaluate",
    "state_to_numpy",
    "load_numpy_state",
    "binary_weight_names",
]

Batch = tuple[torch.Tensor, torch.Tensor]
Array = np.ndarray | torch.Tensor

OPTIMIZERS = ("adam", "sgd")


def make_optimizer(
    model: nn.Module,
    name: str = "adam",
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool | None = None,
) -> torch.optim.Optimizer:
    """Adam or SGD over the model's parameters.

    Weight decay is applied to float parameters only: decaying binary layers' latent weights
    pulls them toward zero, where their sign flips on noise (Bi-Real and Larq train them
    without decay). SGD uses Nesterov momentum whenever ``momentum > 0`` unless ``nesterov``
    says otherwise (``False``: classic momentum, as Caffe and the gossip paper's code).
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
        use_nesterov = momentum > 0 if nesterov is None else bool(nesterov and momentum > 0)
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=use_nesterov, fused=True)
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def freeze(teacher: nn.Module) -> nn.Module:
    """``teacher`` in eval mode with no parameter asking for gradients; returns it.

    A distillation teacher: its batch norms use their running statistics, and a backward pass
    through it (a data-free generator's) still reaches its inputs.
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


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


def cosine_schedule(
    lr: float, epoch: int, epochs: int, steps_per_epoch: int
) -> Callable[[int], float]:
    """``lr_at(step)`` for the steps of ``epoch``: cosine decay from ``lr`` to 0 over ``epochs``.

    The ``lr_at`` of :func:`train_steps`, shared by the trainer and the architecture search.
    """

    def lr_at(step: int) -> float:
        progress = (epoch * steps_per_epoch + step) / (epochs * steps_per_epoch)
        return 0.5 * lr * (1.0 + math.cos(math.pi * progress))

    return lr_at


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
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Run one optimizer step per batch of ``data_iter``; return mean loss and train accuracy.

    Latent weights of binary layers are clipped after every step. ``lr_at(step)`` sets the
    learning rate before each step; ``on_step(step, loss, batch_size)`` reports progress.
    ``extra_loss()``, called after each forward pass, returns a term added to the loss: a
    regulariser that forward hooks collected during that pass (data-free distillation adds the
    student's batch-norm statistics loss this way).
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
        if extra_loss is not None:
            loss = loss + extra_loss()
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


# ------------------------------------------------------------------------------ batches


def _tensor(array: Array) -> torch.Tensor:
    return (
        array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    )


class BatchSampler:
    """Mini-batches of ``(x, y)`` in three orders: :meth:`epoch`, :meth:`endless`, :meth:`fresh`.

    Batches are drawn from the samples ``indices`` (all by default). ``x`` and ``y`` are numpy
    arrays or torch tensors (numpy ones are wrapped, not copied); each batch is a pair of new
    tensors, images and labels of the same samples.
    """

    def __init__(
        self, x: Array, y: Array, batch_size: int, indices: np.ndarray | None = None
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = _tensor(x), _tensor(y)
        self.batch_size = batch_size
        self.indices = np.arange(len(self.x)) if indices is None else np.asarray(indices)

    def epoch(self, seed: int, epoch: int) -> Iterator[Batch]:
        """One shuffled pass over the samples (the trainer's); the last batch may be short.

        The shuffle is seeded by ``(seed, epoch)`` alone, so a run resumed at any epoch draws
        the same batches as one that never stopped.
        """
        rng = np.random.default_rng(seed * 100_003 + epoch)
        order = self.indices[rng.permutation(len(self.indices))]
        size = self.batch_size
        return self._gather(order[i : i + size] for i in range(0, len(order), size))

    def endless(self, rng: np.random.Generator) -> Iterator[Batch]:
        """Passes over the samples without end, reshuffled by ``rng`` before each (the simulator's).

        Every batch holds :meth:`draw_size` samples; a pass's short remainder is dropped (its
        samples come up again in later passes).
        """
        size = self.draw_size()

        def parts() -> Iterator[np.ndarray]:
            while True:
                order = self.indices[rng.permutation(len(self.indices))]
                for start in range(0, len(order) - size + 1, size):
                    yield order[start : start + size]

        return self._gather(parts())

    def fresh(self, rng: np.random.Generator) -> Iterator[Batch]:
        """Batches without end, each :meth:`draw_size` samples drawn afresh (the agent's).

        No sample repeats within a batch; batches are independent of each other. Each batch
        takes exactly one ``rng.choice`` call, made only when the batch is asked for, so ``rng``
        can be shared with other uses (the agent also picks its peers with it).
        """
        size, count = self.draw_size(), len(self.indices)
        return self._gather(
            self.indices[rng.choice(count, size=size, replace=False)] for _ in itertools.count()
        )

    def pooled(self, label_probs: Array, rng: np.random.Generator) -> Iterator[Batch]:
        """Batches without end, each sample's label drawn with ``label_probs`` (a pool node's).

        Every sample of a batch of ``batch_size`` independently takes label ``c`` with
        probability ``label_probs[c]`` and then one of the samples of that label, uniformly
        (with replacement: a batch may repeat a sample). This is how a ``dirichlet-pool`` node
        draws from the whole training split (:func:`toolkit.partition.dirichlet_pool`), in the
        simulator and on a device. Each batch takes two ``rng`` calls, made only when the batch
        is asked for. Labels must be class numbers ``0 <= y < len(label_probs)``.

        Raises:
            ValueError: probabilities that are not finite, negative or all zero, labels
                outside their range, or a positive probability for a class with no sample.
        """
        probs = np.asarray(
            label_probs.numpy() if isinstance(label_probs, torch.Tensor) else label_probs,
            dtype=np.float64,
        )
        if probs.ndim != 1 or not np.all(np.isfinite(probs)) or np.any(probs < 0):
            raise ValueError("label_probs must be one finite, non-negative probability per class")
        if probs.sum() <= 0:
            raise ValueError("label_probs are all zero: no label can be drawn")
        if len(self.indices) == 0:
            raise ValueError("cannot draw batches from no samples")
        labels = self.y.numpy()[self.indices].astype(np.int64)
        if int(labels.min()) < 0 or int(labels.max()) >= probs.size:
            raise ValueError(
                f"label_probs has {probs.size} classes but the labels go from "
                f"{int(labels.min())} to {int(labels.max())}"
            )
        counts = np.bincount(labels, minlength=probs.size)
        missing = np.flatnonzero((probs > 0) & (counts == 0))
        if missing.size:
            raise ValueError(f"label_probs gives classes {missing.tolist()} a chance but no sample")
        by_label = self.indices[np.argsort(labels, kind="stable")]
        starts = np.cumsum(counts) - counts
        p = probs / probs.sum()
        size = self.batch_size

        def parts() -> Iterator[np.ndarray]:
            while True:
                classes = rng.choice(p.size, size=size, p=p)
                yield by_label[starts[classes] + rng.integers(0, counts[classes])]

        return self._gather(parts())

    def draw_size(self) -> int:
        """Samples per batch of the endless orders: ``min(batch_size, samples)``."""
        if len(self.indices) == 0:
            raise ValueError("cannot draw batches from no samples")
        return min(self.batch_size, len(self.indices))

    def _gather(self, parts: Iterator[np.ndarray]) -> Iterator[Batch]:
        for part in parts:
            index = torch.from_numpy(part)
            yield self.x[index], self.y[index]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, x: Array, y: Array, batch_size: int = 512) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``(x, y)``, in eval mode.

    The model's mode is restored afterwards. Returns ``accuracy``, ``loss`` and ``samples``;
    raises ValueError on empty data.
    """
    xt, yt = _tensor(x), _tensor(y)
    if len(yt) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for xb, yb in zip(xt.split(batch_size), yt.split(batch_size), strict=True):
            logits = model(xb)
            total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    seen = len(yt)
    return {"accuracy": correct / seen, "loss": total_loss / seen, "samples": seen}


# ------------------------------------------------------------------------ numpy state


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's ``state_dict`` as ``name -> numpy array`` (copies, on the CPU)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Load ``name -> numpy array`` into ``model`` (strictly: the names must match).

    The arrays are copied, so read-only ones (memory-mapped checkpoints, decoded frames) load
    too and the model never shares memory with them.
    """
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v, order="C", copy=True)) for k, v in tensors.items()}
    )


def binary_weight_names(model: nn.Module) -> tuple[str, ...]:
    """State-dict names of the binary layers' latent weights (modules with ``is_binary``).

    Gossip sends these as 1 bit + scale (the ``sign`` codec) and may leave them out of
    variance correction; simulator and agent must agree on the list.
    """
    return tuple(
        f"{name}.weight" for name, m in model.named_modules() if getattr(m, "is_binary", False)
    )
