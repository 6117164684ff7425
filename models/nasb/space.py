"""The NASB search space: a binary cell's candidate operations and its inputs' preprocessing.

Every candidate maps ``N x C x H x W`` to ``N x C x ceil(H/s) x ceil(W/s)`` for stride ``s``
in {1, 2}: channels never change inside a cell, so any op can sit on any edge, and the
search's mixed operation can add them up. :data:`PRIMITIVES` names them in a fixed order (the
columns of the search's architecture parameters):

- ``none``: the zero op (DARTS's way to let an edge vanish); no parameters, no cost;
- ``max_pool_3x3``, ``avg_pool_3x3``: 3x3 pooling, padding 1 (the average excludes padding);
- ``skip_connect``: identity at stride 1; at stride 2 a real-valued factorised reduce;
- ``bin_conv_3x3``, ``bin_conv_5x5``: Bi-Real binary convolutions (below);
- ``bin_dil_conv_3x3``, ``bin_dil_conv_5x5``: the same with dilation 2 (receptive fields 5x5
  and 9x9 at the cost of 3x3 and 5x5).

A binary op is a Bi-Real unit (:class:`models.resnet.BiRealUnit`'s rule, generalised to any
kernel and dilation): ``BN(BinaryConv(sign(x))) + shortcut(x)``, sign by ``approx_sign``,
weights by ``magnitude_aware_sign``, one-padded. The shortcut carries the real-valued
activations past the binarisation: identity at stride 1, a 2x2 average pool at stride 2
(channels are equal inside a cell, so Bi-Real's 1x1 conv after the pool is not needed).

Unlike DARTS, no op starts with a ReLU: a ReLU in front of a sign would turn every negative
value into +1, and Bi-Real's shortcut wants the real values as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import BinaryConv2d
from ..quantizers import QuantizerLike

__all__ = [
    "PRIMITIVES",
    "BINARY_PRIMITIVES",
    "BinaryConvOp",
    "FactorizedReduce",
    "Zero",
    "make_op",
    "preprocess",
    "unknown_op_message",
]

PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "bin_conv_3x3",
    "bin_conv_5x5",
    "bin_dil_conv_3x3",
    "bin_dil_conv_5x5",
)

# name -> (kernel, dilation) of the binary candidates
_BINARY: dict[str, tuple[int, int]] = {
    "bin_conv_3x3": (3, 1),
    "bin_conv_5x5": (5, 1),
    "bin_dil_conv_3x3": (3, 2),
    "bin_dil_conv_5x5": (5, 2),
}
BINARY_PRIMITIVES: tuple[str, ...] = tuple(_BINARY)

INPUT_QUANTIZER = "approx_sign"
KERNEL_QUANTIZER = "magnitude_aware_sign"


def unknown_op_message(name: object) -> str:
    """The one line that names an unknown operation and lists the known ones."""
    return f"unknown operation {name!r}; known operations: {', '.join(PRIMITIVES)}"


class Zero(nn.Module):
    """The ``none`` op: zeros shaped like the op's output (the input, strided, times 0).

    Multiplying the input keeps the graph connected (its dtype, device and batch follow the
    input) and has no parameters. A derived network rarely keeps a ``none`` edge (DARTS's rule
    never picks one), but a hand-written genotype may.
    """

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class FactorizedReduce(nn.Module):
    """Halve height and width without losing 3/4 of the pixels: DARTS's factorised reduce.

    Two real-valued 1x1 stride-2 convs, one on the input and one on the input shifted by one
    pixel (so together they see every pixel), concatenated along channels, then BN. Unlike
    DARTS, no ReLU comes first (see the module's doc), and the shifted input is zero-padded at
    the bottom and right so odd sizes work: both halves give ``ceil(H/2) x ceil(W/2)``, the
    size every other stride-2 op gives.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        if c_out < 2:
            raise ValueError(f"a factorised reduce needs at least 2 output channels, got {c_out}")
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


class BinaryConvOp(nn.Module):
    """A Bi-Real binary convolution with its real-valued shortcut (see the module's doc).

    ``BN(BinaryConv_k,d(sign(x))) + shortcut(x)``; shortcut identity at stride 1, 2x2 average
    pool (ceil mode, padding excluded) at stride 2.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        stride: int,
        dilation: int = 1,
        input_quantizer: QuantizerLike = INPUT_QUANTIZER,
        kernel_quantizer: QuantizerLike = KERNEL_QUANTIZER,
    ) -> None:
        super().__init__()
        self.conv = BinaryConv2d(
            channels,
            channels,
            kernel_size,
            stride,
            padding=dilation * (kernel_size - 1) // 2,
            dilation=dilation,
            bias=False,
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
        )
        self.bn = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = (
            nn.Identity()
            if stride == 1
            else nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) + self.shortcut(x)


def _check(channels: int, stride: int) -> None:
    if stride not in (1, 2):
        raise ValueError(f"an operation's stride must be 1 or 2, got {stride}")
    if channels < 1:
        raise ValueError(f"an operation needs at least 1 channel, got {channels}")


def _skip(channels: int, stride: int) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(channels, channels)


def _binary(channels: int, stride: int, *, kernel_size: int, dilation: int) -> nn.Module:
    return BinaryConvOp(channels, kernel_size, stride, dilation=dilation)


_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "none": lambda c, s: Zero(s),
    "max_pool_3x3": lambda c, s: nn.MaxPool2d(3, s, padding=1),
    "avg_pool_3x3": lambda c, s: nn.AvgPool2d(3, s, padding=1, count_include_pad=False),
    "skip_connect": _skip,
    **{name: partial(_binary, kernel_size=k, dilation=d) for name, (k, d) in _BINARY.items()},
}
assert tuple(_BUILDERS) == PRIMITIVES  # one table, in PRIMITIVES's order


def make_op(name: str, channels: int, stride: int) -> nn.Module:
    """The candidate operation ``name`` on ``channels`` channels at ``stride`` (1 or 2).

    >>> make_op("bin_conv_3x3", 16, 2)(torch.zeros(1, 16, 8, 8)).shape
    torch.Size([1, 16, 4, 4])

    Raises ``ValueError`` naming the known operations for an unknown ``name``.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(unknown_op_message(name))
    _check(channels, stride)
    return builder(channels, stride)


def preprocess(c_in: int, c_out: int, reduce: bool = False) -> nn.Module:
    """Bring a cell input to the cell's channel count (and halve it when ``reduce``).

    A real-valued 1x1 conv + BN (DARTS's ReLUConvBN without the ReLU), or a factorised reduce
    when the input comes from before a reduction cell and so has twice the cell's resolution.
    """
    if c_in < 1 or c_out < 1:
        raise ValueError(f"preprocess needs positive channel counts, got {c_in} -> {c_out}")
    if reduce:
        return FactorizedReduce(c_in, c_out)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
