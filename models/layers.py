"""Binary layers: ``nn.Conv2d`` and ``nn.Linear`` with an input and a kernel quantizer.

The layers keep PyTorch's signatures and defaults and add two keyword arguments, as Larq's
``QuantConv2D`` does:

- ``input_quantizer``: applied to the activations before the convolution (``None``: float);
- ``kernel_quantizer``: applied to the latent float weights in every forward (``None``: float).

The latent weights stay float so the optimizer can accumulate small updates; the forward pass
only ever sees their quantized form. ``latent_clip`` (default 1.0) is the bound that
:func:`models.constraints.clip_latent_weights` enforces after each optimizer step, like Larq's
``weight_clip`` constraint: without it latent values drift far from zero, where the STE gives no
gradient and no step can flip them back.

Padding: when the input is binarized, a zero in the padding would be a third value that no
XNOR-popcount kernel can represent. These layers therefore pad with +1 ("one-padding"), which
the packed-bit runtime reproduces exactly (bit 0 = +1).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import quantizers
from .quantizers import QuantizerLike
from .small_conv import dense_conv2d, use_dense_path

__all__ = ["AWConv2d", "BinaryConv2d", "BinaryLinear", "QuantizedLayer"]

_PadArg = int | tuple[int, int] | str
_PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]


class QuantizedLayer:
    """Mixin with the quantizer bookkeeping shared by the binary conv and dense layers."""

    input_quantizer: nn.Module | None
    kernel_quantizer: nn.Module | None
    latent_clip: float | None

    def _init_quantizers(
        self,
        input_quantizer: QuantizerLike,
        kernel_quantizer: QuantizerLike,
        latent_clip: float | None,
    ) -> None:
        self.input_quantizer = quantizers.get(input_quantizer)
        self.kernel_quantizer = quantizers.get(kernel_quantizer)
        self.latent_clip = None if self.kernel_quantizer is None else latent_clip
        if self.kernel_quantizer is not None and latent_clip is None:
            warnings.warn(
                f"{type(self).__name__} has a kernel quantizer but no latent_clip: latent weights "
                "may grow without bound and stop training. Set latent_clip=1.0 unless you know "
                "why not.",
                stacklevel=3,
            )

    @property
    def is_binary(self) -> bool:
        """True when both activations and weights are binarized (an XNOR-popcount layer)."""
        return self.input_quantizer is not None and self.kernel_quantizer is not None

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: the latent weight through the kernel quantizer."""
        weight: torch.Tensor = self.weight  # type: ignore[attr-defined]
        return weight if self.kernel_quantizer is None else self.kernel_quantizer(weight)

    def _factorized_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # (values, per-output-channel scale): the scale is applied to the layer's output
        weight: torch.Tensor = self.weight  # type: ignore[attr-defined]
        if self.kernel_quantizer is None:
            return weight, None
        factorize = getattr(self.kernel_quantizer, "factorize", None)
        if factorize is None:
            return self.kernel_quantizer(weight), None
        return factorize(weight)

    def quantizer_config(self) -> dict[str, Any]:
        """Serializable quantizer settings, for specs and exporters."""
        return {
            "input_quantizer": quantizers.serialize(self.input_quantizer),
            "kernel_quantizer": quantizers.serialize(self.kernel_quantizer),
            "latent_clip": self.latent_clip,
        }


def _as_pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    """``value`` as an (height, width) pair: an int repeated, or a 2-tuple as it is."""
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (first, second)


def _explicit_padding(
    padding: _PadArg, kernel_size: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding for an int, a pair, 'valid' or 'same'.

    That is ``F.pad``'s order, and the one order the exporters use (``exporters.conventions``
    converts it to ONNX's ``pads``).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', not {padding!r}")
        (kh, kw), (dh, dw) = kernel_size, dilation
        total_h, total_w = dh * (kh - 1), dw * (kw - 1)
        return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    if isinstance(padding, int):
        return (padding, padding, padding, padding)
    ph, pw = padding
    return (pw, pw, ph, ph)


class BinaryConv2d(QuantizedLayer, nn.Conv2d):
    """2-D convolution with quantized inputs and/or weights, one-padded when inputs are binary.

    Arguments are those of :class:`torch.nn.Conv2d` plus ``input_quantizer``,
    ``kernel_quantizer`` (anything :func:`models.quantizers.get` accepts) and ``latent_clip``.
    ``padding_mode`` must stay ``"zeros"`` when inputs are quantized: the layer then pads with
    +1 itself.

    Example::

        conv = BinaryConv2d(64, 128, 3, stride=2, padding=1, bias=False,
                            input_quantizer="approx_sign", kernel_quantizer="magnitude_aware_sign")
    """

    # nn.Conv2d declares these as tuple[int, ...]; a 2-D convolution holds pairs, which
    # __init__ checks, so the layer's own code and the exporters get (height, width) types
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: str | tuple[int, int]
    dilation: tuple[int, int]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: _PadArg = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: _PaddingMode = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        input_quantizer: QuantizerLike = None,
        kernel_quantizer: QuantizerLike = None,
        latent_clip: float | None = 1.0,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self.kernel_size = _as_pair(self.kernel_size)
        self.stride = _as_pair(self.stride)
        self.dilation = _as_pair(self.dilation)
        if not isinstance(self.padding, str):
            self.padding = _as_pair(self.padding)
        self._init_quantizers(input_quantizer, kernel_quantizer, latent_clip)
        if self.input_quantizer is not None and padding_mode != "zeros":
            raise ValueError(
                f"padding_mode={padding_mode!r} is not supported with an input quantizer: "
                "binarized inputs are always padded with +1; use padding_mode='zeros'"
            )
        self.one_padding = _explicit_padding(padding, self.kernel_size, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, scale = self._factorized_weight()
        bias = self.bias if scale is None else None
        if self.input_quantizer is None:
            out = self._conv_forward(x, weight, bias)
        else:
            x = self.input_quantizer(x)
            if use_dense_path(
                x.shape[-2],
                x.shape[-1],
                self.kernel_size,
                self.groups,
                self.stride,
                self.one_padding,
                self.dilation,
            ):
                out = dense_conv2d(
                    x, weight, bias, self.stride, self.one_padding, self.dilation, pad_value=1.0
                )
            else:
                if any(self.one_padding):
                    x = F.pad(x, self.one_padding, value=1.0)
                out = F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        if scale is not None:
            out = out * scale.view(1, -1, 1, 1)
            if self.bias is not None:
                out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", latent_clip={self.latent_clip}" if self.latent_clip else ""
        )


class BinaryLinear(QuantizedLayer, nn.Linear):
    """Fully connected layer with quantized inputs and/or weights.

    Arguments are those of :class:`torch.nn.Linear` plus ``input_quantizer``,
    ``kernel_quantizer`` and ``latent_clip``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        input_quantizer: QuantizerLike = None,
        kernel_quantizer: QuantizerLike = None,
        latent_clip: float | None = 1.0,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_quantizers(input_quantizer, kernel_quantizer, latent_clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight, scale = self._factorized_weight()
        if scale is None:
            return F.linear(x, weight, self.bias)
        out = F.linear(x, weight) * scale
        return out if self.bias is None else out + self.bias


# AW-convolution is a BinaryConv2d with attention on its weights; it lives with the other
# attention modules and is re-exported here, beside the layers it extends.
from .attention import AWConv2d  # noqa: E402
