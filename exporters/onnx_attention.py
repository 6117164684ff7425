"""AW-convolution (:class:`models.attention.AWConv2d`) in ONNX, with standard ops only.

An AW layer computes ``conv(x, A(x) * W + W)`` with per-sample weights. PyTorch runs it on
larger maps as one grouped convolution over the batch (``groups = B``), but ONNX's ``Conv``
takes ``group`` as a fixed attribute, while an artifact's batch dimension is dynamic. The
exported graph therefore writes the same convolution as a batched matrix product over
patches::

    p       = Flatten(GlobalAveragePool(x))                       (N, Cin)
    h       = Relu(Gemm(p, squeeze))                              (N, r)
    U, V    = Reshape(Tanh(Gemm(h, rows))), Reshape(Tanh(Gemm(h, cols))) / k
                                                                  (N, Cout, k), (N, k, K)
    weights = (MatMul(U, V) + 1) * W                              (N, Cout, K)   K = Cin*kh*kw
    patches = Conv(pad(x), one-hot kernel, group=Cin)             (N, K, Ho, Wo)
    y       = Reshape(MatMul(weights, Reshape(patches, (N, K, L))), (N, Cout, Ho, Wo))

The one-hot convolution copies each input channel's ``kh x kw`` neighbourhood into ``kh*kw``
channels (im2col), in the ``(Cin, kh, kw)`` order of the weight's columns; it multiplies by
exact ones and zeros, so the patches are the input's values. A binary layer binarises ``x``
(``Where(x < 0, -1, 1)``) and pads with +1 first, exactly as its PyTorch forward does, and
keeps ``W`` packed one bit per value (unpacked by standard ops, which ONNX Runtime folds into a
constant at session start) with its per-channel scale.

Both flavours get the same nodes: the per-sample weights are real, so no XNOR-popcount kernel
applies and the fast runtime runs the layer in its ONNX Runtime segments, as float work.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import AWConv2d
from models.quantizers import sign

from .onnx_writer import (
    _binary_factors,
    _check_input_quantizer,
    _sign_subgraph,
    _unpack_subgraph,
)
from .packing import pack_conv_weight

__all__ = ["ExportedAWConv"]


def _one_hot_kernel(in_channels: int, kh: int, kw: int) -> torch.Tensor:
    """(Cin*kh*kw, 1, kh, kw): output channel ``c*kh*kw + t`` copies tap ``t`` of channel c."""
    taps = torch.eye(kh * kw).view(kh * kw, 1, kh, kw)
    return taps.repeat(in_channels, 1, 1, 1).contiguous()


def _const(g: Any, values: list[int] | float) -> Any:
    dtype = torch.float32 if isinstance(values, float) else torch.int64
    return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))


class _AWConvFn(torch.autograd.Function):
    """The exported AW layer: torch computes the graph's math, ``symbolic`` emits its nodes."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        x: torch.Tensor,
        sq_w: torch.Tensor,
        sq_b: torch.Tensor,
        rows_w: torch.Tensor,
        rows_b: torch.Tensor,
        cols_w: torch.Tensor,
        cols_b: torch.Tensor,
        weight: torch.Tensor,
        packed: torch.Tensor,
        multiplier: torch.Tensor,
        bias: torch.Tensor,
        one_hot: torch.Tensor,
        attrs: dict[str, Any],
    ) -> torch.Tensor:
        cout, rank, taps = attrs["cout"], attrs["rank"], attrs["taps"]
        h = torch.relu(F.linear(x.mean(dim=(2, 3)), sq_w, sq_b))
        u = torch.tanh(F.linear(h, rows_w, rows_b)).view(-1, cout, rank)
        v = torch.tanh(F.linear(h, cols_w, cols_b)).view(-1, rank, taps) / rank
        base = weight.view(cout, taps) * multiplier.view(cout, 1)
        weights = (torch.bmm(u, v) + 1.0) * base
        if attrs["binary_input"]:
            x = sign(x)
        x = F.pad(x, attrs["padding"], value=1.0 if attrs["binary_input"] else 0.0)
        patches = F.conv2d(x, one_hot, None, attrs["strides"], 0, attrs["dilations"], x.shape[1])
        y = torch.bmm(weights, patches.flatten(2))
        y = y.view(x.shape[0], cout, patches.shape[2], patches.shape[3])
        return y + bias.view(1, -1, 1, 1)

    @staticmethod
    def symbolic(  # noqa: D102
        g: Any,
        x: Any,
        sq_w: Any,
        sq_b: Any,
        rows_w: Any,
        rows_b: Any,
        cols_w: Any,
        cols_b: Any,
        weight: Any,
        packed: Any,
        multiplier: Any,
        bias: Any,
        one_hot: Any,
        attrs: Any,
    ) -> Any:
        cout, rank, taps = attrs["cout"], attrs["rank"], attrs["taps"]
        cin, (kh, kw) = attrs["cin"], attrs["kernel"]
        pooled = g.op("Flatten", g.op("GlobalAveragePool", x), axis_i=1)
        h = g.op("Relu", g.op("Gemm", pooled, sq_w, sq_b, transB_i=1))
        u = g.op(
            "Reshape",
            g.op("Tanh", g.op("Gemm", h, rows_w, rows_b, transB_i=1)),
            _const(g, [-1, cout, rank]),
        )
        v = g.op(
            "Div",
            g.op(
                "Reshape",
                g.op("Tanh", g.op("Gemm", h, cols_w, cols_b, transB_i=1)),
                _const(g, [-1, rank, taps]),
            ),
            _const(g, float(rank)),
        )
        if attrs["packed"]:
            # bits in (kh, kw, Cin) order (exporters.packing) -> columns in (Cin, kh, kw) order
            flat = _unpack_subgraph(g, packed, cout, taps)
            signs = g.op("Reshape", flat, _const(g, [cout, kh, kw, cin]))
            signs = g.op("Transpose", signs, perm_i=[0, 3, 1, 2])
            signs = g.op("Reshape", signs, _const(g, [cout, taps]))
            base = g.op("Mul", signs, g.op("Reshape", multiplier, _const(g, [cout, 1])))
        else:
            base = g.op("Reshape", weight, _const(g, [cout, taps]))
        weights = g.op("Mul", g.op("Add", g.op("MatMul", u, v), _const(g, 1.0)), base)
        pad_value = 0.0
        if attrs["binary_input"]:
            x = _sign_subgraph(g, x)
            pad_value = 1.0
        if any(attrs["padding"]):
            left, right, top, bottom = attrs["padding"]
            x = g.op(
                "Pad",
                x,
                _const(g, [0, 0, top, left, 0, 0, bottom, right]),
                _const(g, pad_value),
                mode_s="constant",
            )
        patches = g.op(
            "Conv",
            x,
            one_hot,
            group_i=cin,
            kernel_shape_i=[kh, kw],
            strides_i=list(attrs["strides"]),
            dilations_i=list(attrs["dilations"]),
        )
        columns = g.op("Reshape", patches, _const(g, [0, taps, -1]))
        y = g.op("MatMul", weights, columns)  # (N, Cout, Ho*Wo)
        out_shape = g.op(
            "Concat",
            _const(g, [0, cout]),
            g.op("Shape", patches, start_i=2),
            axis_i=0,
        )
        y = g.op("Reshape", y, out_shape)
        return g.op("Add", y, g.op("Reshape", bias, _const(g, [1, cout, 1, 1])))


class ExportedAWConv(nn.Module):
    """Stand-in for an :class:`AWConv2d` during export: the graph of the module's doc."""

    def __init__(self, name: str, layer: AWConv2d) -> None:
        super().__init__()
        if layer.input_quantizer is not None:
            _check_input_quantizer(name, layer)
        cout, cin, kh, kw = layer.weight.shape
        packed_weight = layer.kernel_quantizer is not None
        if packed_weight:
            signs, scale = _binary_factors(name, layer)
            packed = torch.from_numpy(pack_conv_weight(signs.numpy()))
            weight = signs
        else:
            scale = torch.ones(cout)
            packed = torch.zeros(1, dtype=torch.uint8)  # unused: the graph reads `weight`
            weight = layer.weight.detach().float()
        for index, tensor in enumerate(
            (
                layer.squeeze.weight,
                layer.squeeze.bias,
                layer.rows.weight,
                layer.rows.bias,
                layer.cols.weight,
                layer.cols.bias,
            )
        ):
            self.register_buffer(f"attention_{index}", tensor.detach().float().clone())
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("packed_weight", packed)
        self.register_buffer("multiplier", scale.contiguous())
        bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(cout)
        self.register_buffer("bias", bias.contiguous())
        self.register_buffer("one_hot", _one_hot_kernel(cin, kh, kw))
        self.attrs: dict[str, Any] = {
            "cout": cout,
            "cin": cin,
            "kernel": (kh, kw),
            "taps": cin * kh * kw,
            "rank": layer.rank,
            "packed": packed_weight,
            "binary_input": layer.input_quantizer is not None,
            "padding": tuple(layer.one_padding),  # (left, right, top, bottom)
            "strides": tuple(layer.stride),
            "dilations": tuple(layer.dilation),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _AWConvFn.apply(
            x,
            *(getattr(self, f"attention_{i}") for i in range(6)),
            self.weight,
            self.packed_weight,
            self.multiplier,
            self.bias,
            self.one_hot,
            self.attrs,
        )
