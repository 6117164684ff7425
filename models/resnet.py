"""ResNet family: Bi-Real ResNet-18/34 (binary) and float ResNet-18/34 of the same layout.

Bi-Real Net (Liu et al., ECCV 2018) keeps a real-valued identity shortcut around *every* binary
3x3 convolution rather than every block of two, so the real-valued activations that binarization
would destroy are carried past each binary conv. A Bi-Real "unit" is::

    out = BN(BinaryConv3x3(sign(x))) + shortcut(x)

with ``sign`` the ApproxSign quantizer and weights through the magnitude-aware sign. The first
convolution, the 1x1 downsampling convolutions and the classifier stay float, as in the paper.

Downsampling shortcuts are ``AvgPool2d(2) -> Conv1x1 -> BN`` (Bi-Real's choice, which avoids
throwing away 3/4 of the activations the way a strided 1x1 conv does). The float ResNets use the
same stem, stages and downsampling with standard basic blocks (conv-BN-ReLU-conv-BN + shortcut,
ReLU), so the two differ only where binarization differs and their layer shapes line up.

Stems: ``"imagenet"`` is conv7x7/2 + BN + max-pool/2 (224x224 inputs); ``"cifar"`` is a conv3x3/1
+ BN with no pooling, for 32x32 inputs.

Attention (``attention=``, :mod:`models.attention`): ``"aw"`` makes every 3x3 convolution of the
stages (binary or float) an :class:`~models.attention.AWConv2d`; ``"se"`` puts a
squeeze-excitation gate on each residual branch after its last batch norm, before the shortcut
is added (Bi-Real: every unit; float: every basic block), as SE-ResNet does; ``"se+aw"`` both.
The stem, the 1x1 shortcuts and the classifier never carry attention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import AWConv2d, SqueezeExcitation, parse_attention
from .init import init_weights
from .layers import BinaryConv2d
from .quantizers import QuantizerLike
from .registry import register_model

__all__ = ["ResNet", "BiRealUnit", "BasicBlock"]

STEMS = ("cifar", "imagenet")


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Real-valued shortcut: identity, or average-pool then 1x1 conv + BN."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    layers: list[nn.Module] = []
    if stride > 1:
        layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
    layers += [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers)


def _conv3x3(aw: bool) -> type[BinaryConv2d]:
    """The 3x3 convolution of a unit or block: with attention on its weights, or plain."""
    return AWConv2d if aw else BinaryConv2d


class BiRealUnit(nn.Module):
    """One binary 3x3 conv with its own real-valued shortcut (Bi-Real's building block).

    ``attention`` (see :data:`models.attention.ATTENTIONS`): ``"aw"`` makes the conv an
    AW-convolution, ``"se"`` gates the branch ``BN(conv(x))`` before the shortcut is added.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        input_quantizer: QuantizerLike,
        kernel_quantizer: QuantizerLike,
        *,
        attention: str = "none",
    ) -> None:
        super().__init__()
        use_se, use_aw = parse_attention(attention)
        self.conv = _conv3x3(use_aw)(
            in_channels,
            out_channels,
            3,
            stride,
            padding=1,
            bias=False,
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.se = SqueezeExcitation(out_channels) if use_se else None
        self.shortcut = _downsample(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        if self.se is not None:
            out = self.se(out)
        return out + self.shortcut(x)


class BasicBlock(nn.Module):
    """Float ResNet basic block: two 3x3 convs with BN and ReLU around one shortcut.

    ``attention``: ``"aw"`` makes both convs AW-convolutions, ``"se"`` gates the branch after
    its second batch norm, before the shortcut is added (SE-ResNet's place).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, *, attention: str = "none"
    ) -> None:
        super().__init__()
        use_se, use_aw = parse_attention(attention)
        conv: type[nn.Conv2d] = AWConv2d if use_aw else nn.Conv2d
        self.conv1 = conv(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.se = SqueezeExcitation(out_channels) if use_se else None
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _downsample(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of four stages, with Bi-Real units (``block="bireal"``) or basic blocks.

    Args:
        block: ``"bireal"`` (binary) or ``"basic"`` (float).
        blocks_per_stage: basic blocks per stage, e.g. ``(2, 2, 2, 2)`` for 18 layers. A Bi-Real
            stage has two units (two binary convs) per block.
        num_classes: classifier outputs.
        stem: ``"cifar"`` or ``"imagenet"``.
        width: multiplier on the stage widths 64, 128, 256, 512.
        in_channels: input image channels.
        input_quantizer, kernel_quantizer: quantizers of the binary convs (Bi-Real only).
        attention: ``"none"``, ``"se"``, ``"aw"`` or ``"se+aw"`` (see the module doc).
    """

    def __init__(
        self,
        block: str,
        blocks_per_stage: tuple[int, ...],
        *,
        num_classes: int = 10,
        stem: str = "cifar",
        width: float = 1.0,
        in_channels: int = 3,
        input_quantizer: QuantizerLike = "approx_sign",
        kernel_quantizer: QuantizerLike = "magnitude_aware_sign",
        attention: str = "none",
    ) -> None:
        super().__init__()
        parse_attention(attention)  # a bad name fails here, before anything is built
        if block not in ("bireal", "basic"):
            raise ValueError(f"unknown ResNet block {block!r}; use 'bireal' or 'basic'")
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; use one of {', '.join(STEMS)}")
        if width <= 0 or num_classes < 1 or in_channels < 1:
            raise ValueError("width must be > 0, num_classes and in_channels >= 1")
        widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        float_net = block == "basic"

        stem_layers: list[nn.Module]
        if stem == "imagenet":
            stem_layers = [nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)]
        else:
            stem_layers = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        stem_layers.append(nn.BatchNorm2d(widths[0]))
        if float_net:
            stem_layers.append(nn.ReLU(inplace=True))
        if stem == "imagenet":
            stem_layers.append(nn.MaxPool2d(3, 2, 1))
        # torch's type stubs omit Module.to's memory_format keyword
        self.stem = nn.Sequential(*stem_layers).to(  # type: ignore[call-overload]
            memory_format=torch.channels_last
        )

        stages = []
        channels = widths[0]
        for index, (out_channels, blocks) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            units: list[nn.Module] = []
            for b in range(blocks):
                stride = 2 if index > 0 and b == 0 else 1
                if float_net:
                    units.append(BasicBlock(channels, out_channels, stride, attention=attention))
                else:
                    units.append(
                        BiRealUnit(
                            channels,
                            out_channels,
                            stride,
                            input_quantizer,
                            kernel_quantizer,
                            attention=attention,
                        )
                    )
                    units.append(
                        BiRealUnit(
                            out_channels,
                            out_channels,
                            1,
                            input_quantizer,
                            kernel_quantizer,
                            attention=attention,
                        )
                    )
                channels = out_channels
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        # The stem runs channels-last: on CPU its max-pool is ~5x faster in that layout (oneDNN),
        # while the stages are faster in NCHW; the layout switch costs one small copy.
        x = self.stem(x.contiguous(memory_format=torch.channels_last)).contiguous()
        x = self.stages(x)
        return self.classifier(self.pool(x).flatten(1))


@register_model(family="resnet")
def bireal18(
    num_classes: int = 10,
    stem: str = "cifar",
    width: float = 1.0,
    in_channels: int = 3,
    input_quantizer: str | None = "approx_sign",
    kernel_quantizer: str | None = "magnitude_aware_sign",
    attention: str = "none",
) -> ResNet:
    """Bi-Real ResNet-18: 16 binary 3x3 convs, each with a real shortcut (ImageNet 56.4%)."""
    return ResNet(
        "bireal",
        (2, 2, 2, 2),
        num_classes=num_classes,
        stem=stem,
        width=width,
        in_channels=in_channels,
        input_quantizer=input_quantizer,
        kernel_quantizer=kernel_quantizer,
        attention=attention,
    )


@register_model(family="resnet")
def bireal34(
    num_classes: int = 10,
    stem: str = "cifar",
    width: float = 1.0,
    in_channels: int = 3,
    input_quantizer: str | None = "approx_sign",
    kernel_quantizer: str | None = "magnitude_aware_sign",
    attention: str = "none",
) -> ResNet:
    """Bi-Real ResNet-34: 32 binary 3x3 convs, each with a real shortcut (ImageNet 62.2%)."""
    return ResNet(
        "bireal",
        (3, 4, 6, 3),
        num_classes=num_classes,
        stem=stem,
        width=width,
        in_channels=in_channels,
        input_quantizer=input_quantizer,
        kernel_quantizer=kernel_quantizer,
        attention=attention,
    )


@register_model(family="resnet")
def resnet18(
    num_classes: int = 10,
    stem: str = "cifar",
    width: float = 1.0,
    in_channels: int = 3,
    attention: str = "none",
) -> ResNet:
    """Float ResNet-18 in Bi-Real's layout (avg-pool downsampling shortcuts)."""
    return ResNet(
        "basic",
        (2, 2, 2, 2),
        num_classes=num_classes,
        stem=stem,
        width=width,
        in_channels=in_channels,
        attention=attention,
    )


@register_model(family="resnet")
def resnet34(
    num_classes: int = 10,
    stem: str = "cifar",
    width: float = 1.0,
    in_channels: int = 3,
    attention: str = "none",
) -> ResNet:
    """Float ResNet-34 in Bi-Real's layout (avg-pool downsampling shortcuts)."""
    return ResNet(
        "basic",
        (3, 4, 6, 3),
        num_classes=num_classes,
        stem=stem,
        width=width,
        in_channels=in_channels,
        attention=attention,
    )
