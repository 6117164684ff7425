"""The float ops of bitfleet's exported networks in numpy, so a small model needs no ORT.

In the fast flavour a network's float parts are few (a stem convolution, batch norms, pooling,
1x1 shortcut convolutions, the classifier), and on a small input they are cheap. ONNX Runtime
runs them well, but loading it costs about 30 MB of resident memory on a device (19 MB of
library, 10 MB for the first session): more than everything else a LeNet-5 agent holds. For
such models the runtime evaluates the float nodes here instead, with numpy (whose BLAS does the
matrix products), and never imports onnxruntime. Large float work (a 7x7 stem on a 224x224
image) still goes to ORT, which is faster at it: :func:`plan_cost` is how the runtime decides.

Each op follows the ONNX operator specification for the attributes bitfleet's exporters
write; :func:`supported` says whether a node stays within them (anything else goes to ORT).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .conventions import pool_extra_padding
from .onnx_proto import Node

__all__ = ["supported", "run", "OPS"]

_Op = Callable[[Node, list[Any]], np.ndarray]


def _pads2d(node: Node) -> tuple[int, int, int, int]:
    """ONNX 2-D pads [top, left, bottom, right] (default 0)."""
    pads = node.attributes.get("pads") or [0, 0, 0, 0]
    return int(pads[0]), int(pads[1]), int(pads[2]), int(pads[3])


def _pair(node: Node, name: str) -> tuple[int, int]:
    value = node.attributes.get(name) or [1, 1]
    return int(value[0]), int(value[1])


def _windows(
    x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
):
    """(N, C, Ho, Wo, kh, kw) view of the (already padded) x's receptive fields."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    view = sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    return view[:, :, ::sh, ::sw, ::dh, ::dw]


def _taps(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]):
    """Yield the (N, C, Ho, Wo) strided view of the (padded) x under each kernel tap.

    Pooling reduces over these views one tap at a time: on the small maps of an edge model
    that is several times faster than reducing a window view over its last two axes.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    out_h = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dh, kx * dw
            yield x[:, :, y0 : y0 + sh * (out_h - 1) + 1 : sh, x0 : x0 + sw * (out_w - 1) + 1 : sw]


def _reduce_taps(x: np.ndarray, kernel, strides, dilations, combine) -> np.ndarray:
    taps = _taps(x, kernel, strides, dilations)
    out = np.array(next(taps))
    for view in taps:
        combine(out, view, out=out)
    return out


def _conv(node: Node, args: list[Any]) -> np.ndarray:
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 and args[2] is not None else None
    top, left, bottom, right = _pads2d(node)
    group = int(node.attributes.get("group", 1))
    cout, cin_g, kh, kw = w.shape
    strides, dilations = _pair(node, "strides"), _pair(node, "dilations")
    if (kh, kw) == (1, 1) and group == 1 and not top + left + bottom + right:
        # a 1x1 convolution (Bi-Real's shortcuts) is one matrix product over channels
        sampled = x[:, :, :: strides[0], :: strides[1]]
        n, c, h, wd = sampled.shape
        out = (w.reshape(cout, c) @ sampled.reshape(n, c, h * wd)).reshape(n, cout, h, wd)
        return out + bias.reshape(1, -1, 1, 1) if bias is not None else out
    padded = (
        np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        if top + left + bottom + right
        else x
    )
    windows = _windows(padded, (kh, kw), strides, dilations)
    n, _, out_h, out_w = windows.shape[:4]
    outputs = []
    per_group = cout // group
    for g in range(group):
        part = windows[:, g * cin_g : (g + 1) * cin_g]
        # im2col: (N*Ho*Wo, Cin*kh*kw), ordered like the weight's (Cin, kh, kw)
        cols = part.transpose(0, 2, 3, 1, 4, 5).reshape(n * out_h * out_w, cin_g * kh * kw)
        weights = w[g * per_group : (g + 1) * per_group].reshape(per_group, -1)
        outputs.append(cols @ weights.T)
    out = np.concatenate(outputs, axis=1) if group > 1 else outputs[0]
    if bias is not None:
        out = out + bias
    return np.ascontiguousarray(out.reshape(n, out_h, out_w, cout).transpose(0, 3, 1, 2))


def _batch_norm(node: Node, args: list[Any]) -> np.ndarray:
    """``x * a + b`` with ``a = scale / sqrt(var + eps)``, ``b = shift - mean * a``.

    The order of operations of PyTorch's and ONNX Runtime's inference kernels: a value that a
    binary layer then binarises sits within rounding of zero now and then, and a different
    order flips its sign (one such flip moved Bi-Real-34's logits by 2e-3 of their scale).
    """
    x, scale, shift, mean, var = args[:5]
    eps = np.float32(node.attributes.get("epsilon", 1e-5))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    a = scale * (np.float32(1) / np.sqrt(var + eps))
    b = shift - mean * a
    return x * a.astype(x.dtype).reshape(shape) + b.astype(x.dtype).reshape(shape)


def _pool_geometry(node: Node, height: int, width: int) -> tuple[Any, ...]:
    """Kernel, strides, declared pads (top, left, bottom, right), extra bottom/right padding.

    The extra padding is what ``ceil_mode`` needs for its last, partial windows (only windows
    that start inside the input or its declared padding are kept, as the ONNX spec says).
    """
    kernel = (int(node.attributes["kernel_shape"][0]), int(node.attributes["kernel_shape"][1]))
    strides = _pair(node, "strides")
    top, left, bottom, right = _pads2d(node)
    ceil = bool(node.attributes.get("ceil_mode", 0))
    extra = (
        pool_extra_padding(height, kernel[0], strides[0], (top, bottom), ceil),
        pool_extra_padding(width, kernel[1], strides[1], (left, right), ceil),
    )
    return kernel, strides, (top, left, bottom, right), (extra[0], extra[1])


def _max_pool(node: Node, args: list[Any]) -> np.ndarray:
    x = args[0]
    kernel, strides, (top, left, bottom, right), (more_h, more_w) = _pool_geometry(
        node, x.shape[2], x.shape[3]
    )
    pads = ((0, 0), (0, 0), (top, bottom + more_h), (left, right + more_w))
    if any(p for pair in pads for p in pair):
        x = np.pad(x, pads, constant_values=-np.inf)
    return _reduce_taps(x, kernel, strides, _pair(node, "dilations"), np.maximum)


def _average_pool(node: Node, args: list[Any]) -> np.ndarray:
    x = args[0]
    kernel, strides, (top, left, bottom, right), (more_h, more_w) = _pool_geometry(
        node, x.shape[2], x.shape[3]
    )
    pads = ((0, 0), (0, 0), (top, bottom + more_h), (left, right + more_w))
    padded = np.pad(x, pads) if any(p for pair in pads for p in pair) else x
    sums = _reduce_taps(padded, kernel, strides, (1, 1), np.add)
    if padded is x:
        return sums * np.float32(1.0 / (kernel[0] * kernel[1]))
    counts = average_pool_counts(
        (x.shape[2], x.shape[3]),
        kernel,
        strides,
        (top, left, bottom, right),
        (more_h, more_w),
        bool(node.attributes.get("count_include_pad", 0)),
    )
    return (sums / counts.astype(x.dtype)).astype(x.dtype)


def average_pool_counts(
    size: tuple[int, int],
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    extra: Sequence[int],
    count_include_pad: bool,
) -> np.ndarray:
    """What each output position of an average pool divides by, as an (out_h, out_w) array.

    ONNX's and PyTorch's rule: the input's positions in the window, plus the declared ``pads``
    (top, left, bottom, right) when ``count_include_pad``; ceil mode's ``extra`` bottom/right
    padding never counts. The runtimes without this rule (TFLite) pool with zero padding and
    rescale by ``kernel area / counts``.
    """
    height, width = size
    top, left, bottom, right = pads
    counted = np.zeros((height + top + bottom + extra[0], width + left + right + extra[1]))
    if count_include_pad:
        counted[: height + top + bottom, : width + left + right] = 1
    else:
        counted[top : top + height, left : left + width] = 1
    windows = sliding_window_view(counted, (kernel[0], kernel[1]))[:: strides[0], :: strides[1]]
    return windows.sum(axis=(2, 3))


def _gemm(node: Node, args: list[Any]) -> np.ndarray:
    a, b = args[0], args[1]
    if node.attributes.get("transA", 0):
        a = a.T
    if node.attributes.get("transB", 0):
        b = b.T
    out = a @ b
    alpha = node.attributes.get("alpha", 1.0)
    if alpha != 1.0:
        out = out * np.float32(alpha)
    if len(args) > 2 and args[2] is not None:
        beta = node.attributes.get("beta", 1.0)
        out = out + (args[2] if beta == 1.0 else args[2] * np.float32(beta))
    return out


def _flatten(node: Node, args: list[Any]) -> np.ndarray:
    x = args[0]
    axis = int(node.attributes.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _dequantize(node: Node, args: list[Any]) -> np.ndarray:
    x, scale = args[0], args[1]
    zero = args[2] if len(args) > 2 and args[2] is not None else None
    axis = int(node.attributes.get("axis", 1))
    shape = [1] * x.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[axis] = -1
    values = x.astype(np.float32)
    if zero is not None:
        values = values - zero.astype(np.float32).reshape(shape)
    return values * scale.astype(np.float32).reshape(shape)


OPS: dict[str, _Op] = {
    "DequantizeLinear": _dequantize,
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "Relu": lambda node, args: np.maximum(args[0], np.float32(0)),
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": lambda node, args: args[0].mean(axis=(2, 3), keepdims=True),
    "Flatten": _flatten,
    "Gemm": _gemm,
    "Add": lambda node, args: args[0] + args[1],
    "Sub": lambda node, args: args[0] - args[1],
    "Mul": lambda node, args: args[0] * args[1],
    "Div": lambda node, args: args[0] / args[1],
    "Concat": lambda node, args: np.concatenate(args, axis=int(node.attributes["axis"])),
}
"""The ops evaluated here, by ONNX op type (default domain)."""


def supported(node: Node) -> bool:
    """Whether :func:`run` evaluates ``node`` exactly as the ONNX spec says (else: ORT)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
        return False
    attrs = node.attributes
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return False
    if node.op_type in ("Conv", "MaxPool", "AveragePool"):
        kernel = attrs.get("kernel_shape")
        spatial = [attrs.get(k) for k in ("strides", "dilations")] + [kernel]
        if (
            any(v is not None and len(v) != 2 for v in spatial)
            or len(attrs.get("pads") or [0] * 4) != 4
        ):
            return False
        if node.op_type != "Conv" and kernel is None:
            return False
    if node.op_type == "BatchNormalization" and len(node.outputs) > 1:
        return False  # training mode
    return True


def run(node: Node, args: list[Any]) -> np.ndarray:
    """The output of ``node`` (a :func:`supported` one) on float32 numpy inputs."""
    return OPS[node.op_type](node, args)


def macs(node: Node, args: list[Any], out: np.ndarray) -> int:
    """Multiply-accumulates of a Conv or Gemm call (0 for the cheap elementwise ops)."""
    if node.op_type == "Conv":
        return int(out.size * np.prod(args[1].shape[1:]))
    if node.op_type == "Gemm":
        inner = args[0].shape[0] if node.attributes.get("transA", 0) else args[0].shape[-1]
        return int(out.size * inner)
    return 0
