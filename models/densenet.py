"""BinaryDenseNet (Bethge et al., 2019): binary DenseNets that keep features by concatenation.

A binary 3x3 convolution loses most of what its real-valued input carried. Bi-Real Net keeps
that information with real-valued *additive* shortcuts; BinaryDenseNet keeps it by
*concatenation*: every layer appends ``growth`` new (binary-conv) feature maps to all the maps
before it, so nothing earlier is ever overwritten. A dense layer is::

    out = concat(x, BinaryConv3x3(sign(BN(x))))

Between the dense stages a *reduction* (transition) block shrinks the channels by a factor and
halves the resolution: ``BN -> MaxPool2d(2) -> ReLU -> float Conv1x1``. Max-pool rather than
average-pool, and a float 1x1 conv, are the paper's choices for keeping information. The output
channels are ``round(C // reduction / 32) * 32``, as in Larq's zoo.

Layouts (Larq zoo ``larq_zoo.literature.densenet``; ImageNet weights: 60.9% / 62.9% Top-1):

=================  ======================  =================  ============
model              dense layers per stage  reductions         growth
=================  ======================  =================  ============
binarydensenet28   6, 6, 6, 5              2.7, 2.7, 2.2      64
binarydensenet37   6, 8, 12, 6             3.3, 3.3, 4        64
=================  ======================  =================  ============

Both start with 64 channels. Larq binarizes inputs and weights with ``SteSign(clip_value=1.3)``
and clips latent weights to 1.3; here the latent clip is 1.3 too, and the quantizers are
bitfleet's ``ste_sign`` (pass ``{"name": "ste_sign", "clip_value": 1.3}`` for Larq's exact
gradient window). Larq has no batch-norm scale on the binary conv's output: the next layer's BN
(or the reduction's) sees the concatenation.

Stems (``stem=``, as in :mod:`models.resnet`): ``"imagenet"`` is conv7x7/2 + BN + ReLU +
max-pool 3/2 (224x224 inputs); ``"cifar"`` is one conv3x3/1 with nothing after it (Larq's stem
for inputs under 50 pixels; the first dense layer starts with BN).

``width`` scales the initial filters, the growth rate and the multiple (32) that reductions
round to, so ``width=1`` is exactly Larq's network and tiny widths stay well formed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .init import init_weights
from .layers import BinaryConv2d
from .quantizers import QuantizerLike
from .registry import register_model

__all__ = [
    "BinaryDenseNet",
    "BinaryDenseConv",
    "DenseLayer",
    "Reduction",
    "STEMS",
    "LATENT_CLIP",
    "BlockFactory",
    "reduced_channels",
]

STEMS = ("cifar", "imagenet")
LATENT_CLIP = 1.3
"""Larq zoo's weight clip (and STE window) for BinaryDenseNet."""

_ROUND_TO = 32


class BinaryDenseConv(nn.Module):
    """``BN -> binary 3x3 conv``: the ``out_channels`` new feature maps of one dense layer."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        input_quantizer: QuantizerLike,
        kernel_quantizer: QuantizerLike,
    ) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = BinaryConv2d(
            in_channels,
            out_channels,
            3,
            padding=1,
            bias=False,
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
            latent_clip=LATENT_CLIP,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.bn(x))


class DenseLayer(nn.Module):
    """One BinaryDenseNet layer: ``concat(x, BinaryDenseConv(x))``, ``growth`` channels more."""

    def __init__(
        self,
        in_channels: int,
        growth: int,
        input_quantizer: QuantizerLike,
        kernel_quantizer: QuantizerLike,
    ) -> None:
        super().__init__()
        self.new = BinaryDenseConv(in_channels, growth, input_quantizer, kernel_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.new(x)], 1)


class Reduction(nn.Module):
    """Reduction block: ``BN -> MaxPool2d(2) -> ReLU -> float Conv1x1`` (channels and size)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.pool = nn.MaxPool2d(2, 2)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.relu(self.pool(self.bn(x))))


def reduced_channels(channels: int, reduction: float, multiple: int = _ROUND_TO) -> int:
    """Larq's reduction width, ``round(C // reduction / multiple) * multiple``.

    Never below one multiple: at tiny widths the formula would otherwise round to zero channels.
    """
    return max(1, round(channels // reduction / multiple)) * multiple


BlockFactory = Callable[[int, int], tuple[nn.Module, int]]
"""``(in_channels, growth) -> (block, out_channels)``: what a dense stage is made of."""


class BinaryDenseNet(nn.Module):
    """A BinaryDenseNet: stem, dense stages with reductions between them, BN-ReLU-pool head.

    Args:
        layers: blocks per stage, e.g. ``(6, 6, 6, 5)`` for BinaryDenseNet-28.
        reduction: channel reduction factor of each reduction block (one fewer than stages).
        num_classes: classifier outputs.
        stem: ``"cifar"`` or ``"imagenet"``.
        width: multiplier on ``initial_filters``, ``growth`` and the reduction rounding (32).
        growth: channels each dense layer adds (at ``width=1``).
        initial_filters: channels of the stem (at ``width=1``).
        in_channels: input image channels.
        input_quantizer, kernel_quantizer: quantizers of the binary convs.
        block: builds one block of a stage from ``(in_channels, growth)``; default
            :class:`DenseLayer`. SoFAr's dense fractal (:mod:`models.fractal`) plugs in here.
    """

    def __init__(
        self,
        layers: Sequence[int],
        reduction: Sequence[float],
        *,
        num_classes: int = 10,
        stem: str = "cifar",
        width: float = 1.0,
        growth: int = 64,
        initial_filters: int = 64,
        in_channels: int = 3,
        input_quantizer: QuantizerLike = "ste_sign",
        kernel_quantizer: QuantizerLike = "ste_sign",
        block: BlockFactory | None = None,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; use one of {', '.join(STEMS)}")
        if len(reduction) != len(layers) - 1:
            raise ValueError(
                f"{len(layers)} stages need {len(layers) - 1} reduction factors, "
                f"got {len(reduction)}"
            )
        if width <= 0 or growth < 1 or initial_filters < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                "width must be > 0; growth, initial_filters, num_classes and in_channels >= 1"
            )
        first = max(1, round(initial_filters * width))
        rate = max(1, round(growth * width))
        multiple = max(1, round(_ROUND_TO * width))
        if block is None:

            def block(cin: int, g: int) -> tuple[nn.Module, int]:
                return DenseLayer(cin, g, input_quantizer, kernel_quantizer), cin + g

        stem_layers: list[nn.Module]
        if stem == "imagenet":
            stem_layers = [
                nn.Conv2d(in_channels, first, 7, 2, 3, bias=False),
                nn.BatchNorm2d(first),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            ]
        else:
            stem_layers = [nn.Conv2d(in_channels, first, 3, 1, 1, bias=False)]
        # torch's type stubs omit Module.to's memory_format keyword
        self.stem = nn.Sequential(*stem_layers).to(  # type: ignore[call-overload]
            memory_format=torch.channels_last
        )

        features: list[nn.Module] = []
        channels = first
        for index, count in enumerate(layers):
            for _ in range(count):
                module, channels = block(channels, rate)
                features.append(module)
            if index < len(layers) - 1:
                out = reduced_channels(channels, reduction[index], multiple)
                features.append(Reduction(channels, out))
                channels = out
        self.features = nn.Sequential(*features)
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def stem_forward(self, x: Tensor) -> Tensor:
        """The stem, run channels-last (its max-pool is ~5x faster so on CPU; see ResNet)."""
        return self.stem(x.contiguous(memory_format=torch.channels_last)).contiguous()

    def head_forward(self, x: Tensor) -> Tensor:
        """BN, ReLU, global average pool and classifier."""
        return self.classifier(self.pool(self.head(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head_forward(self.features(self.stem_forward(x)))


BDN28_LAYERS = (6, 6, 6, 5)
BDN28_REDUCTION = (2.7, 2.7, 2.2)
BDN37_LAYERS = (6, 8, 12, 6)
BDN37_REDUCTION = (3.3, 3.3, 4.0)


@register_model(family="densenet")
def binarydensenet28(
    num_classes: int = 10,
    stem: str = "cifar",
    width: float = 1.0,
    growth: int = 64,
    in_channels: int = 3,
    input_quantizer: str | None = "ste_sign",
    kernel_quantizer: str | None = "ste_sign",
) -> BinaryDenseNet:
    """BinaryDenseNet-28: 23 binary dense layers, growth 64 (Larq zoo; ImageNet 60.9%)."""
    return BinaryDenseNet(
        BDN28_LAYERS,
        BDN28_REDUCTION,
        num_classes=num_classes,
        stem=stem,
        width=width,
        growth=growth,
        in_channels=in_channels,
        input_quantizer=input_quantizer,
        kernel_quantizer=kernel_quantizer,
    )


@register_model(family="densenet")
def binarydensenet37(
    num_classes: int = 10,
    stem: str = "cifar",
    width: float = 1.0,
    growth: int = 64,
    in_channels: int = 3,
    input_quantizer: str | None = "ste_sign",
    kernel_quantizer: str | None = "ste_sign",
) -> BinaryDenseNet:
    """BinaryDenseNet-37: 32 binary dense layers, growth 64 (Larq zoo; ImageNet 62.9%)."""
    return BinaryDenseNet(
        BDN37_LAYERS,
        BDN37_REDUCTION,
        num_classes=num_classes,
        stem=stem,
        width=width,
        growth=growth,
        in_channels=in_channels,
        input_quantizer=input_quantizer,
        kernel_quantizer=kernel_quantizer,
    )
