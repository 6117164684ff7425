"""Constraints on latent weights, applied after each optimizer step.

Larq attaches ``weight_clip`` to a layer as a Keras kernel constraint. PyTorch has no such hook,
so the training loop calls :func:`clip_latent_weights` after ``optimizer.step()``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["clip_latent_weights", "latent_weight_parameters"]


def latent_weight_parameters(model: nn.Module) -> list[tuple[nn.Parameter, float]]:
    """Every latent weight that carries a clip bound, with its bound."""
    found = []
    for module in model.modules():
        clip = getattr(module, "latent_clip", None)
        weight = getattr(module, "weight", None)
        if clip is not None and isinstance(weight, nn.Parameter):
            found.append((weight, float(clip)))
    return found


@torch.no_grad()
def clip_latent_weights(model: nn.Module) -> int:
    """Clip every quantized layer's latent weights to ``[-latent_clip, latent_clip]``.

    Returns the number of tensors clipped, so callers can tell a float model (0) apart.
    """
    params = latent_weight_parameters(model)
    for weight, clip in params:
        weight.clamp_(-clip, clip)
    return len(params)
