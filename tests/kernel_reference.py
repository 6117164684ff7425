"""The numpy reference of a binary convolution, shared by the kernels' tests."""

from __future__ import annotations

import numpy as np

from exporters.conventions import sign


def reference_conv(x, w, stride, padding, dilation, multiplier=None, bias=None, residual=None):
    """Float conv of sign(x) (padded with +1) and sign(w), by explicit taps, in float64.

    ``padding`` is (left, right, top, bottom), bitfleet's (and ``F.pad``'s) order.
    """
    (sh, sw), (left, right, top, bottom), (dh, dw) = stride, padding, dilation
    xs = np.pad(sign(x), ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=1)
    ws = sign(w)
    cout, _, kh, kw = w.shape
    out_h = (xs.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (xs.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((x.shape[0], cout, out_h, out_w))
    for ky in range(kh):
        for kx in range(kw):
            patch = xs[
                :,
                :,
                ky * dh : ky * dh + sh * (out_h - 1) + 1 : sh,
                kx * dw : kx * dw + sw * (out_w - 1) + 1 : sw,
            ]
            out += np.einsum("oc,nchw->nohw", ws[:, :, ky, kx], patch)
    if multiplier is not None:
        out = out * multiplier[None, :, None, None]
    if bias is not None:
        out = out + bias[None, :, None, None]
    if residual is not None:
        out = out + residual
    return out
