"""The batch-norm statistics loss: how far a batch looks from the data a network was trained on.

Every batch-norm layer of a trained network stores the running mean and variance of its input
over the training data. A batch whose inputs to those layers have the same per-channel mean and
variance "looks like" the training data to the network, layer by layer. GDFQ (Xu et al., ECCV
2020) trains its generator against this distance; ZeroQ (Cai et al., CVPR 2020) optimises a
batch of inputs against it directly.

:class:`BNStatistics` hooks every batch-norm layer of a network and, after a forward pass,
returns the loss the way GDFQ's public code computes it: for each layer, the mean squared
difference between the batch mean of its input and the running mean plus the same for the
(population) variance, averaged over the layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bitfleet.errors import BitfleetError

__all__ = ["BNStatistics", "NoBatchNormError", "batch_norm_layers"]


class NoBatchNormError(BitfleetError, ValueError):
    """A network without batch-norm statistics to match."""


def batch_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The batch-norm layers of ``model`` that keep running statistics, in forward order."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def _batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population variance of an (N, C, ...) input."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


class BNStatistics:
    """Forward hooks on every batch-norm layer of a network; :meth:`loss` after each pass.

    Args:
        model: the network whose batch-norm layers are hooked.
        frozen: compare against a copy of the running statistics taken now (the student's case:
            its own running statistics move while it trains; the targets stay the teacher's it
            started from) instead of the layers' live buffers (the teacher's case: frozen
            anyway).

    Use as a context manager (the hooks come off on exit)::

        with BNStatistics(teacher) as bns:
            logits = teacher(images)
            loss = F.cross_entropy(logits, labels) + 0.1 * bns.loss()

    Raises:
        NoBatchNormError: the network has no batch-norm layer with running statistics.
    """

    def __init__(self, model: nn.Module, *, frozen: bool = False) -> None:
        self.layers = batch_norm_layers(model)
        if not self.layers:
            raise NoBatchNormError(
                f"{type(model).__name__} has no batch-norm layers, so there are no stored "
                "statistics to match"
            )
        self._targets: list[tuple[Tensor, Tensor]] | None = None
        if frozen:
            self._targets = [
                (layer.running_mean.detach().clone(), layer.running_var.detach().clone())  # type: ignore[union-attr]
                for layer in self.layers
            ]
        self._terms: list[Tensor] = []
        self._handles: list[Any] = []

    def _target(self, index: int) -> tuple[Tensor, Tensor]:
        if self._targets is not None:
            return self._targets[index]
        layer = self.layers[index]
        return layer.running_mean, layer.running_var  # type: ignore[return-value]

    def _hook(self, index: int) -> Any:
        def record(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            mean, var = _batch_moments(inputs[0])
            target_mean, target_var = self._target(index)
            self._terms.append(
                torch.mean((mean - target_mean) ** 2) + torch.mean((var - target_var) ** 2)
            )

        return record

    def attach(self) -> BNStatistics:
        """Put the hooks on (idempotent)."""
        if not self._handles:
            self._handles = [
                layer.register_forward_pre_hook(self._hook(i))
                for i, layer in enumerate(self.layers)
            ]
        return self

    def detach(self) -> None:
        """Take the hooks off and forget what they recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._terms = []

    def __enter__(self) -> BNStatistics:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def loss(self) -> Tensor:
        """The loss of the forward pass(es) since the last call, averaged over layers; resets.

        Raises:
            RuntimeError: no forward pass ran through the hooked layers since the last call.
        """
        if not self._terms:
            raise RuntimeError("no forward pass recorded: run the network before asking its loss")
        total = torch.stack(self._terms).sum() / len(self.layers)
        self._terms = []
        return total
