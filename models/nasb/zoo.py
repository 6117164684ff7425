"""The registered NASB models: ``nasb`` builds any genotype (``genotype=`` a dict or a JSON path).

The spec of a ``nasb`` model holds the genotype itself (a path given to :func:`models.create`
is read then), so a saved spec or checkpoint rebuilds the network without the file.

Without ``genotype=`` the network uses :data:`BASELINE`, a hand-written cell (not searched):
Bi-Real-like binary 3x3 convs with a dilated conv, a pool and a skip for variety, so ``nasb``
alone builds, trains and exports like every registered model.
"""

from __future__ import annotations

import os
from typing import Any

from ..registry import register_model
from .genotype import Genotype
from .network import DEFAULT_CHANNELS, DEFAULT_LAYERS, NASBNetwork

__all__ = ["BASELINE", "NASB_A", "NASB_A_CHANNELS", "channels_for", "nasb", "nasb_a"]

BASELINE = Genotype.from_dict(
    {
        "normal": [
            ["bin_conv_3x3", 0],
            ["bin_conv_3x3", 1],
            ["bin_conv_3x3", 1],
            ["skip_connect", 2],
            ["bin_dil_conv_3x3", 2],
            ["skip_connect", 0],
            ["bin_conv_3x3", 3],
            ["avg_pool_3x3", 1],
        ],
        "reduce": [
            ["max_pool_3x3", 0],
            ["bin_conv_3x3", 1],
            ["bin_conv_3x3", 1],
            ["skip_connect", 2],
            ["bin_conv_5x5", 0],
            ["max_pool_3x3", 2],
            ["bin_dil_conv_3x3", 3],
            ["skip_connect", 2],
        ],
    }
)


NASB_A = Genotype.from_dict(
    {
        "normal": [
            ["skip_connect", 0],
            ["bin_dil_conv_5x5", 1],
            ["skip_connect", 0],
            ["bin_dil_conv_5x5", 2],
            ["max_pool_3x3", 3],
            ["max_pool_3x3", 2],
            ["max_pool_3x3", 4],
            ["max_pool_3x3", 2],
        ],
        "reduce": [
            ["bin_conv_5x5", 1],
            ["skip_connect", 0],
            ["max_pool_3x3", 2],
            ["bin_dil_conv_5x5", 1],
            ["max_pool_3x3", 3],
            ["max_pool_3x3", 2],
            ["max_pool_3x3", 4],
            ["max_pool_3x3", 3],
        ],
    }
)
"""The cell bitfleet's own search found on digits-hard (docs/reproductions/nasb.md has the run).

``bitfleet search --dataset digits-hard --target-ops 1.73e8 --epochs 8 --warmup-epochs 2
--arch-lr 3e-3 --seed 0``: the default supernet (8 cells, 20 channels, every candidate).
"""

NASB_A_CHANNELS = 19
"""``nasb_a``'s first-cell channels: its OPs at 224x224 within 5% of Bi-Real-18's (1.640e8)."""


def _with_genotype_dict(args: dict[str, Any]) -> dict[str, Any]:
    """The spec form of ``nasb``'s arguments: the genotype as its validated dict."""
    source = args.get("genotype")
    genotype = BASELINE if source is None else Genotype.load(source)
    return {**args, "genotype": genotype.to_dict()}


def channels_for(channels: int, width: float) -> int:
    """The first cells' channel count: ``channels * width``, rounded, at least 2."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(2, round(channels * width))


@register_model(family="nasb", canonical=_with_genotype_dict)
def nasb(
    genotype: dict[str, Any] | str | os.PathLike[str] | None = None,
    num_classes: int = 10,
    stem: str = "cifar",
    width: float = 1.0,
    channels: int = DEFAULT_CHANNELS,
    layers: int = DEFAULT_LAYERS,
    in_channels: int = 3,
) -> NASBNetwork:
    """NASB network of any genotype: binary cells stacked DARTS-style (docs/nasb.md)."""
    return NASBNetwork(
        Genotype.load(genotype if genotype is not None else BASELINE),
        channels=channels_for(channels, width),
        layers=layers,
        num_classes=num_classes,
        in_channels=in_channels,
        stem=stem,
    )


@register_model(family="nasb")
def nasb_a(
    num_classes: int = 10,
    stem: str = "cifar",
    width: float = 1.0,
    channels: int = NASB_A_CHANNELS,
    layers: int = DEFAULT_LAYERS,
    in_channels: int = 3,
) -> NASBNetwork:
    """NASB network of the cell bitfleet's search found (NASB_A), at Bi-Real-18's OPs."""
    return nasb(NASB_A.to_dict(), num_classes, stem, width, channels, layers, in_channels)
