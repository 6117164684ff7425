"""Fake-quantised layers (:class:`models.quantized.QuantConv2d`, ``QuantLinear``) in ONNX.

Both flavours write the same standard ops (opset 18), the QDQ form that ONNX Runtime and
TensorRT recognise as an int8 layer::

    x  = Clip(x, low, high)                    only when activation_bits < 8
    xq = QuantizeLinear(x, scale, zero_point)  per tensor, uint8 zero point
    x  = DequantizeLinear(xq, scale, zero_point)
    w  = DequantizeLinear(W_int8, w_scale, axis=0)   per output channel, symmetric
    y  = Add(Conv(x, w), bias)   |   Add(Gemm(x, w, transB=1), bias)   (MatMul beyond 2-D)

``QuantizeLinear`` saturates to uint8's [0, 255]; a narrower activation range
([0, 2^b - 1]) is enforced by the ``Clip`` to the float interval it represents, which yields
the same integers as clamping after rounding. The weights are stored as int8 initializers, one
byte a weight (about 4x smaller than FP32); int4 (and other widths under 8) weights are stored
in int8 too, with values in [-(2^(b-1) - 1), 2^(b-1) - 1]: opset 18 has no 4-bit type. The
bias and the scales stay float. The fast runtime runs these nodes in its ONNX Runtime segments.

The graph computes what the PyTorch layer computes: same rounding (half to even), same
division by the scale, and the dequantised weight ``q * scale`` equal to the fake-quantised
one, so outputs differ only by float summation order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.quantized import FakeQuantizedLayer, QuantConv2d, QuantLinear, fake_quantize

from .conventions import onnx_pads
from .onnx_writer import ExportError

__all__ = ["ExportedQuantLayer"]


def _padding(name: str, layer: QuantConv2d) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` zero padding of a conv, or an ExportError."""
    if layer.padding_mode != "zeros":
        raise ExportError(
            f"layer '{name}': padding_mode={layer.padding_mode!r} is not exported for quantised "
            "convolutions; use padding_mode='zeros'"
        )
    (kh, kw), (dh, dw) = layer.kernel_size, layer.dilation
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return (0, 0, 0, 0)
        total_h, total_w = dh * (kh - 1), dw * (kw - 1)  # 'same'
        return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    ph, pw = layer.padding
    return (pw, pw, ph, ph)


class _QuantLayerFn(torch.autograd.Function):
    """The exported layer: torch computes its math, ``symbolic`` emits the QDQ nodes."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        x: torch.Tensor,
        weight_q: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        attrs: dict[str, Any],
    ) -> torch.Tensor:
        x = fake_quantize(x, scale, zero_point.float(), 0, attrs["qmax"])
        shape = (-1,) + (1,) * (weight_q.dim() - 1)
        weight = weight_q.float() * weight_scale.view(shape)
        if not attrs["is_conv"]:
            return F.linear(x, weight, bias)
        left, right, top, bottom = attrs["padding"]
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, weight, bias, attrs["strides"], 0, attrs["dilations"], attrs["groups"])

    @staticmethod
    def symbolic(  # noqa: D102
        g: Any,
        x: Any,
        weight_q: Any,
        weight_scale: Any,
        bias: Any,
        scale: Any,
        zero_point: Any,
        attrs: Any,
    ) -> Any:
        rank = x.type().dim() if x.type() is not None else None
        if attrs["clip"] is not None:
            low, high = attrs["clip"]
            x = g.op(
                "Clip",
                x,
                g.op("Constant", value_t=low),
                g.op("Constant", value_t=high),
            )
        xq = g.op("QuantizeLinear", x, scale, zero_point)
        x = g.op("DequantizeLinear", xq, scale, zero_point)
        weight = g.op("DequantizeLinear", weight_q, weight_scale, axis_i=0)
        # the bias is added by its own node: given to Conv / Gemm, ONNX Runtime quantises a
        # float bias to int32 at scale x_scale * w_scale (its QDQ weight-bias transformer),
        # which moves outputs by up to half that step and breaks parity with PyTorch
        if attrs["is_conv"]:
            y = g.op(
                "Conv",
                x,
                weight,
                kernel_shape_i=list(attrs["kernel"]),
                pads_i=list(onnx_pads(attrs["padding"])),
                strides_i=list(attrs["strides"]),
                dilations_i=list(attrs["dilations"]),
                group_i=attrs["groups"],
            )
            bias = g.op("Reshape", bias, g.op("Constant", value_t=torch.tensor([1, -1, 1, 1])))
        elif rank == 2:
            y = g.op("Gemm", x, weight, transB_i=1)
        else:
            y = g.op("MatMul", x, g.op("Transpose", weight, perm_i=[1, 0]))
        return g.op("Add", y, bias)


class ExportedQuantLayer(nn.Module):
    """Stand-in for a :class:`QuantConv2d` / :class:`QuantLinear` during export.

    Holds the int8 weights and per-channel scales, the activation scale and uint8 zero point
    (from the layer's fixed range) and the float bias; no float copy of the weight.
    """

    def __init__(self, name: str, layer: QuantConv2d | QuantLinear) -> None:
        super().__init__()
        if not isinstance(layer, FakeQuantizedLayer) or not layer.observed:
            raise ExportError(
                f"layer '{name}' has no activation range yet: run a few train-mode batches "
                "through the model (calibration or distillation) before exporting it"
            )
        weight_q, weight_scale = layer.integer_weight()
        self.register_buffer("weight_q", weight_q.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        cout = weight_q.shape[0]
        bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(cout)
        self.register_buffer("bias", bias.contiguous())
        scale, zero_point, act_qmax = layer.activation_qparams()
        self.register_buffer("scale", scale.float().reshape(()))
        self.register_buffer("zero_point", zero_point.to(torch.uint8).reshape(()))
        clip = None
        if act_qmax < 255:  # QuantizeLinear saturates at uint8's 255: clip the float range
            clip = ((0 - zero_point) * scale, (act_qmax - zero_point) * scale)
            clip = (clip[0].float().reshape(()), clip[1].float().reshape(()))
        self.attrs: dict[str, Any] = {
            "is_conv": isinstance(layer, QuantConv2d),
            "qmax": act_qmax,
            "clip": clip,
        }
        if isinstance(layer, QuantConv2d):
            self.attrs.update(
                kernel=tuple(layer.kernel_size),
                padding=_padding(name, layer),
                strides=tuple(layer.stride),
                dilations=tuple(layer.dilation),
                groups=layer.groups,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantLayerFn.apply(
            x,
            self.weight_q,
            self.weight_scale,
            self.bias,
            self.scale,
            self.zero_point,
            self.attrs,
        )
