"""The vanishing-variance paper's augmentation: a small rotation and a whole-pixel shift.

Both simulator engines use it: the loop draws and resamples one batch at a time
(:func:`augment_batch`); the batched engine (:mod:`toolkit.sim_batched`) draws every node's
angles and shifts in the same order (:func:`augment_draws`) and resamples many images at once
with the same affine matrices (:func:`affine_matrices`), so the two agree image for image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["affine_matrices", "augment_batch", "augment_draws"]


def augment_draws(
    count: int, generator: torch.Generator, degrees: float = 5.0, padding: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random angles and shifts for ``count`` images, drawn in this order (float64).

    Angles are uniform in ``[-degrees, degrees]`` (in radians); shifts are whole pixels,
    uniform in ``[-padding, padding]`` on each axis.
    """
    angle = (torch.rand(count, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(
        degrees
    )
    shift = torch.randint(-padding, padding + 1, (count, 2), generator=generator)
    return angle, shift.to(torch.float64)


def affine_matrices(
    angle: torch.Tensor, shift: torch.Tensor, height: int, width: int, dtype: torch.dtype
) -> torch.Tensor:
    """``affine_grid``'s (N, 2, 3) matrices: rotate by ``angle``, then move by ``shift`` pixels.

    Output pixel p reads input pixel R^-1 (p - d); in ``affine_grid``'s [-1, 1] coordinates x
    is scaled by 2 / width and y by 2 / height.
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    a = torch.stack(
        [
            torch.stack([cos, sin * height / width], dim=1),
            torch.stack([-sin * width / height, cos], dim=1),
        ],
        dim=1,
    )
    d = torch.stack([shift[:, 0] * 2 / width, shift[:, 1] * 2 / height], dim=1)
    return torch.cat([a, -(a @ d.unsqueeze(2))], dim=2).to(dtype)


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    fill: torch.Tensor | float = 0.0,
    degrees: float = 5.0,
    padding: int = 2,
) -> torch.Tensor:
    """Rotate each image by a uniform angle in ``[-degrees, degrees]``, then shift it.

    The shift is a whole number of pixels, uniform in ``[-padding, padding]`` on each axis: a
    random crop of the image padded by ``padding`` (torchvision's ``RandomCrop(size,
    padding)``), which with the rotation makes the paper code's augmentation. Both are one
    bilinear resampling (``affine_grid`` / ``grid_sample``); pixels that come from outside the
    image take ``fill``, per channel: pass the normalised value of a black pixel,
    ``-mean / std``. Angles, then shifts, are drawn from ``generator``, so a seeded generator
    gives the same batches every run. Returns a new tensor; ``x`` is left as it was.
    """
    n, channels, height, width = x.shape
    angle, shift = augment_draws(n, generator, degrees, padding)
    theta = affine_matrices(angle, shift, height, width, x.dtype)
    grid = F.affine_grid(theta, [n, channels, height, width], align_corners=False)
    base = torch.as_tensor(fill, dtype=x.dtype).reshape(-1, 1, 1)
    moved = F.grid_sample(
        x - base, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return moved + base
