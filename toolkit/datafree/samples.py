"""``samples.png``: a grid of generated images, one row per class, to see what the student saw."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bitfleet.errors import require
from bitfleet.fsutil import atomic_write_bytes

__all__ = ["sample_grid", "write_sample_grid"]


def sample_grid(
    images: Tensor,
    labels: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    per_class: int = 8,
    max_classes: int = 10,
    scale: int = 2,
) -> np.ndarray:
    """An (H, W, 3) uint8 grid: row ``c`` holds up to ``per_class`` images of class ``c``.

    Images are un-normalised with the teacher's ``mean`` and ``std`` (the inverse of the
    normalisation its data had), clipped to [0, 1], enlarged ``scale`` times (nearest), and
    separated by 2-pixel gaps; a class with fewer images leaves its row short.
    """
    x = images.detach().float().cpu()
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x * s + m).clamp(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x[:, :3].repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    size, gap = x.shape[-1], 2
    classes = sorted({int(v) for v in labels.tolist()})[:max_classes]
    rows, cols = max(1, len(classes)), per_class
    grid = np.full((rows * (size + gap) + gap, cols * (size + gap) + gap, 3), 255, dtype=np.uint8)
    for row, label in enumerate(classes):
        picks = (labels == label).nonzero().flatten()[:per_class]
        for col, index in enumerate(picks.tolist()):
            tile = (x[index].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
            top, left = gap + row * (size + gap), gap + col * (size + gap)
            grid[top : top + size, left : left + size] = tile
    return grid


def write_sample_grid(grid: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a grid from :func:`sample_grid` as a PNG, atomically."""
    require("PIL", "train", "writing samples.png")
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(grid, mode="RGB").save(buffer, format="PNG")
    target = Path(path)
    atomic_write_bytes(target, buffer.getvalue())
    return target
