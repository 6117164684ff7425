"""The conventions the export path shares, each defined once (pure Python: no torch, no numpy).

The ONNX writer, the graph rewrites, the packed-bit format, the XNOR-popcount kernels, the
runtime and the artifact reader all import them from here, so they cannot drift apart.

Names
    ``CUSTOM_DOMAIN`` is the ONNX domain of bitfleet's custom nodes, ``BINARY_CONV_OP`` and
    ``BINARY_DENSE_OP`` their op types, ``FORMATS`` the artifact formats one writer produces.

Sign
    A binary value is +1 or -1 with ``sign(0) = +1``: :func:`sign_bit` is 1 (True), meaning -1,
    exactly where ``x < 0``, and 0, meaning +1, for +0.0, -0.0 and NaN (the packed-bit format's
    convention, Larq Compute Engine's). :func:`bit_value` maps a bit back to its value. Both
    work elementwise on Python numbers, numpy arrays and torch tensors alike; the native
    kernels (``exporters/csrc``) binarise with the same test, ``x < 0.0f``.

Padding
    bitfleet's one order is PyTorch's ``F.pad`` order for the last two axes, ``(left, right,
    top, bottom)``, which :attr:`models.layers.BinaryConv2d.one_padding` holds and the kernels
    take. :func:`onnx_pads` is the one conversion to ONNX's ``pads`` attribute,
    ``(top, left, bottom, right)`` (every axis's start, then every axis's end), and
    :func:`from_onnx_pads` its inverse. Binary convolutions pad with +1 (bit 0).

Output size
    :func:`conv_output_size` is the size of a convolution's (or pooling's) output along one axis.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = [
    "CUSTOM_DOMAIN",
    "CUSTOM_DOMAIN_VERSION",
    "BINARY_CONV_OP",
    "BINARY_DENSE_OP",
    "CUSTOM_OPS",
    "FORMAT_FAST",
    "FORMAT_PORTABLE",
    "FORMAT_TRT",
    "FORMAT_TENSORRT",
    "FORMAT_TFLITE",
    "ONNX_FORMATS",
    "FORMATS",
    "Padding",
    "sign_bit",
    "bit_value",
    "sign",
    "padding4",
    "onnx_pads",
    "from_onnx_pads",
    "conv_output_size",
    "pool_extra_padding",
]

CUSTOM_DOMAIN = "bitfleet"
"""ONNX domain of the binary nodes of the fast flavour."""

CUSTOM_DOMAIN_VERSION = 1

BINARY_CONV_OP = "BinaryConv2d"
"""``BinaryConv2d(X, W_packed, multiplier, bias[, residual])``: attributes ``in_channels``,
``kernel_shape``, ``strides``, ``pads`` (ONNX order), ``dilations``; pads with +1."""

BINARY_DENSE_OP = "BinaryDense"
"""``BinaryDense(X, W_packed, multiplier, bias)``: attribute ``in_features``."""

CUSTOM_OPS = (BINARY_CONV_OP, BINARY_DENSE_OP)

FORMAT_FAST = "onnx"
"""Binary layers as ``bitfleet`` custom-domain nodes, run by bitfleet's kernels."""

FORMAT_PORTABLE = "onnx-portable"
"""The same packed weights unpacked by standard ops: any ONNX runtime loads it."""

FORMAT_TRT = "onnx-trt"
"""Standard ops on TensorRT's ONNX parser list only: binary layers as int8 +-1 convolutions
between Q/DQ pairs of scale 1 (explicit quantization: exact int32 accumulation)."""

FORMAT_TENSORRT = "tensorrt"
"""A TensorRT engine built from the ``onnx-trt`` graph on the machine that runs it."""

FORMAT_TFLITE = "tflite"
"""A TFLite flatbuffer of builtin ops (LiteRT, tflite-runtime): binary layers in exact int8
or float forms, translated from the ``onnx-trt`` graph."""

ONNX_FORMATS = (FORMAT_FAST, FORMAT_PORTABLE, FORMAT_TRT)
"""The formats whose model is an ONNX graph (what the ONNX writer produces)."""

FORMATS = (*ONNX_FORMATS, FORMAT_TENSORRT, FORMAT_TFLITE)

Padding = tuple[int, int, int, int]
"""Spatial padding in bitfleet's (PyTorch's) order: ``(left, right, top, bottom)``."""

_T = TypeVar("_T")


def sign_bit(x: _T) -> _T:
    """The packed bit of ``x``: True (1, meaning -1) iff ``x < 0``; +-0.0 and NaN give 0 (+1)."""
    return x < 0  # type: ignore[operator,return-value]


def bit_value(bit: Any) -> Any:
    """The value a packed bit stands for: 0 -> +1.0, 1 -> -1.0 (floats, elementwise)."""
    return 1.0 - 2.0 * bit


def sign(x: Any) -> Any:
    """``+1.0`` where ``x >= 0`` (and for -0.0 and NaN), ``-1.0`` where ``x < 0``; elementwise."""
    return bit_value(sign_bit(x))


def padding4(value: int | Sequence[int]) -> Padding:
    """Normalize padding to ``(left, right, top, bottom)``.

    Accepts an int (every side), an ``(h, w)`` pair (as ``nn.Conv2d`` takes it) or four values
    already in ``(left, right, top, bottom)`` order.
    """
    vals: tuple[int, ...]
    if isinstance(value, int) or isinstance(value, numbers.Integral):
        vals = (int(value),) * 4
    else:
        vals = tuple(int(v) for v in value)
        if len(vals) == 2:
            vals = (vals[1], vals[1], vals[0], vals[0])
        elif len(vals) != 4:
            raise ValueError(f"padding must be an int, a pair or 4 values, got {value!r}")
    if min(vals) < 0:
        raise ValueError(f"padding must be >= 0, got {value!r}")
    left, right, top, bottom = vals
    return (left, right, top, bottom)


def onnx_pads(padding: Padding) -> Padding:
    """``(left, right, top, bottom)`` -> ONNX ``pads`` for H, W: ``(top, left, bottom, right)``."""
    left, right, top, bottom = padding
    return (top, left, bottom, right)


def from_onnx_pads(pads: Sequence[int]) -> Padding:
    """ONNX ``pads`` ``(top, left, bottom, right)`` -> ``(left, right, top, bottom)``."""
    top, left, bottom, right = (int(p) for p in pads)
    return (left, right, top, bottom)


def conv_output_size(
    size: int, kernel: int, stride: int = 1, pad: tuple[int, int] = (0, 0), dilation: int = 1
) -> int:
    """Output length along one axis of a convolution or pooling (floor mode).

    ``pad`` is (before, after) along that axis: ``(top, bottom)`` for height, ``(left, right)``
    for width.
    """
    return (size + pad[0] + pad[1] - dilation * (kernel - 1) - 1) // stride + 1


def pool_extra_padding(
    size: int, kernel: int, stride: int, pad: tuple[int, int], ceil_mode: bool
) -> int:
    """Padding a pooling needs past ``pad[1]`` for ``ceil_mode``'s last, partial window.

    Only windows that start inside the input or its declared padding are kept (the ONNX spec,
    PyTorch's rule); floor mode needs none. Runtimes without a ceil mode pad by this much and
    pool in floor mode.
    """
    total = size + pad[0] + pad[1]
    if not ceil_mode:
        return 0
    out = -(-(total - kernel) // stride) + 1
    if (out - 1) * stride >= size + pad[0]:  # the last window would start in the padding
        out -= 1
    return max(0, (out - 1) * stride + kernel - total)
