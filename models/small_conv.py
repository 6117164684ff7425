"""Convolutions on tiny feature maps, run as one dense matrix product.

Why: at the end of a ResNet the feature maps are 2x2 or 1x1 (with 32x32 inputs and the ImageNet
stem). A 3x3 convolution there mostly multiplies padding, and oneDNN's backward pass on such
shapes runs at a few percent of the machine's peak. When the input has no more pixels than the
kernel has taps (``H * W <= kh * kw``), the convolution is cheaper as the linear map it is::

    out[n, :] = x[n, :] @ T(w)        x: (N, Cin*H*W), T: (Cin*H*W, Cout*Ho*Wo)

where ``T`` (the Toeplitz expansion of the kernel) holds each weight at every (input pixel,
output pixel) pair it connects, and zeros elsewhere. A 3x3 conv on a 1x1 map becomes a GEMM
with its centre tap only, nine times less work. ``T`` is gathered from the kernel with a cached
index, so autograd gives the kernel's gradient through ``index_select``'s backward.

Padding with a constant ``c`` (bitfleet's binary convs pad with +1) adds ``c * conv(P, w)``,
where ``P`` is 1 on the padding ring and 0 inside: a batch-independent term computed once per
call. Results equal ``F.conv2d`` on the padded input exactly for +-1 inputs and weights (sums of
integers in float32) and to float rounding otherwise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["use_dense_path", "dense_conv2d"]


def _out_size(
    size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int
) -> int:
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True)
class _Plan:
    """How kernel taps connect input and output pixels for one conv geometry."""

    taps: tuple[torch.Tensor, ...]  # per output pixel: (H*W,) the tap reading each input pixel
    ring: torch.Tensor  # (Ho*Wo, kh*kw) 1 where the tap lands on padding
    out_h: int
    out_w: int


@functools.lru_cache(maxsize=128)
def _plan(
    height: int,
    width: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> _Plan | None:
    """The tap map, or None when some output pixel does not see every input pixel."""
    kh, kw = kernel_size
    left, right, top, bottom = padding
    out_h = _out_size(height, kh, stride[0], top, bottom, dilation[0])
    out_w = _out_size(width, kw, stride[1], left, right, dilation[1])
    taps = []
    ring = torch.zeros(out_h * out_w, kh * kw)
    for i in range(out_h):
        for j in range(out_w):
            tap = torch.full((height, width), -1, dtype=torch.long)
            for a in range(kh):
                for b in range(kw):
                    y = i * stride[0] - top + a * dilation[0]
                    x = j * stride[1] - left + b * dilation[1]
                    if 0 <= y < height and 0 <= x < width:
                        tap[y, x] = a * kw + b
                    else:
                        ring[i * out_w + j, a * kw + b] = 1.0
            if (tap < 0).any():
                return None
            taps.append(tap.reshape(-1))
    return _Plan(tuple(taps), ring, out_h, out_w)


def use_dense_path(
    height: int,
    width: int,
    kernel_size: tuple[int, int],
    groups: int,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int, int, int] = (1, 1, 1, 1),
    dilation: tuple[int, int] = (1, 1),
) -> bool:
    """Whether the per-pixel products do no more multiply-adds than the convolution.

    That holds when the map has no more pixels than the kernel has taps and every output pixel
    sees the whole input (so no product multiplies a structural zero).
    """
    if groups != 1 or height * width > kernel_size[0] * kernel_size[1]:
        return False
    return (
        _plan(height, width, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
        is not None
    )


def dense_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    pad_value: float = 0.0,
) -> torch.Tensor:
    """``F.conv2d(F.pad(x, padding, value=pad_value), weight, bias, stride, 0, dilation)`` as GEMMs.

    ``padding`` is (left, right, top, bottom), as ``F.pad`` takes it. Each output pixel sees
    the whole (tiny) input, each input pixel through one kernel tap, so output pixel ``p`` is
    ``x.flatten(1) @ W_p.T`` with ``W_p[:, cin * H*W + q] = weight[:, cin, tap_p(q)]``: a gather
    along the kernel's last axis, in the weight's own memory order, and one GEMM.
    """
    n, cin, height, width = x.shape
    cout, _, kh, kw = weight.shape
    plan = _plan(height, width, (kh, kw), tuple(stride), tuple(padding), tuple(dilation))
    if plan is None:
        raise ValueError("dense_conv2d needs every output pixel to see the whole input")
    taps = weight.reshape(cout, cin, kh * kw)
    rows = x.reshape(n, cin * height * width)
    outs = [F.linear(rows, taps.index_select(2, tap).reshape(cout, -1)) for tap in plan.taps]
    out = torch.stack(outs, dim=2) if len(outs) > 1 else outs[0].unsqueeze(2)
    if pad_value != 0.0 and any(padding):
        # the padding ring's contribution is the same for every sample: sum the kernel over
        # input channels and add up the taps that land on padding
        ring = taps.sum(dim=1) @ plan.ring.to(weight.dtype).t()  # (Cout, Ho*Wo)
        out = out + pad_value * ring
    if bias is not None:
        out = out + bias.view(1, -1, 1)
    return out.reshape(n, cout, plan.out_h, plan.out_w)
