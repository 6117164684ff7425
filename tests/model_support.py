"""Which registered models are binary, and the input each takes in the export tests."""

from __future__ import annotations

import models

BINARY_MODELS = [
    name
    for name in models.list_models()
    if any(getattr(m, "is_binary", False) for m in models.create(name).modules())
]
"""Registered models with at least one binary layer (every one must export exactly)."""


def export_input_shape(name: str) -> tuple[int, int, int]:
    """(C, H, W) the export tests feed ``name``: LeNet-5 reads 1-channel 32x32, others RGB."""
    return (1, 32, 32) if name == "lenet5" else (3, 32, 32)
