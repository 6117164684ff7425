"""Write a trained network as a packed-bit ONNX model, in two flavours from one writer.

Binary layers (both activations and weights binarized) are exported with their weights packed
one bit per value (:mod:`exporters.packing`: bit 1 = -1, LSB-first along (kh, kw, Cin)), as
uint8 initializers, and their per-channel scale as a float multiplier:

- ``onnx`` (fast): each binary layer is one node of the ``bitfleet`` domain,
  ``BinaryConv2d(X, W_packed, multiplier, bias[, residual])`` or
  ``BinaryDense(X, W_packed, multiplier, bias)``. The node binarizes X itself and pads with
  +1. After export, a batch norm that follows a binary conv is folded into its multiplier and
  bias, and a shortcut ``Add`` into its residual input, so bitfleet's runtime runs a whole
  Bi-Real unit as one XNOR-popcount kernel call.
- ``onnx-portable``: the same uint8 initializers, unpacked by standard ops
  (BitShift, BitwiseAnd, Cast) in front of a standard Conv / Gemm, with sign and +1 padding as
  standard ops too. Any ONNX runtime loads it; stock ONNX Runtime folds the unpacking into
  constants at session start.

Layers that are not binary (the first conv, 1x1 downsampling convs, batch norm, pooling,
the classifier) are exported by ``torch.onnx.export`` as usual. The writer refuses modules it
does not know rather than exporting something it cannot vouch for.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Sequence
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from bitfleet.errors import BitfleetError
from models.layers import BinaryConv2d, BinaryLinear
from models.quantizers import ApproxSign, MagnitudeAwareSign, Quantizer, SteSign, SwishSign

from .packing import pack_conv_weight, pack_linear_weight

__all__ = ["ExportError", "FORMATS", "CUSTOM_DOMAIN", "OPSET", "to_onnx"]

FORMATS = ("onnx", "onnx-portable")
CUSTOM_DOMAIN = "bitfleet"
CUSTOM_DOMAIN_VERSION = 1
OPSET = 18

_SIGN_QUANTIZERS = (SteSign, ApproxSign, SwishSign)  # forward is plain sign
_KERNEL_QUANTIZERS = (SteSign, ApproxSign, SwishSign, MagnitudeAwareSign)

# Leaf modules the writer knows how to export (containers are walked through).
_KNOWN_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.PReLU,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Identity,
    nn.Flatten,
    nn.Dropout,
)


class ExportError(BitfleetError, ValueError):
    """A model the writer cannot export faithfully."""


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x).add_(0.5).sign_()


def _check_quantizers(name: str, layer: BinaryConv2d | BinaryLinear) -> None:
    iq, kq = layer.input_quantizer, layer.kernel_quantizer
    if iq is not None and not isinstance(iq, _SIGN_QUANTIZERS):
        raise ExportError(
            f"layer '{name}' uses input quantizer {type(iq).__name__}, which the writer cannot "
            f"export; use one of ste_sign, approx_sign, swish_sign"
        )
    if kq is not None and not isinstance(kq, _KERNEL_QUANTIZERS):
        raise ExportError(
            f"layer '{name}' uses kernel quantizer {type(kq).__name__}, which the writer cannot "
            "export; use ste_sign, approx_sign, swish_sign or magnitude_aware_sign"
        )


def _scale_and_signs(layer: BinaryConv2d | BinaryLinear) -> tuple[torch.Tensor, torch.Tensor]:
    weight = layer.weight.detach().float()
    if isinstance(layer.kernel_quantizer, MagnitudeAwareSign):
        dims = tuple(range(1, weight.dim()))
        scale = weight.abs().mean(dim=dims)
    else:
        scale = torch.ones(weight.shape[0])
    return scale, _sign(weight.clone())


# --- autograd functions whose ``symbolic`` emits the ONNX nodes ---------------------------


def _unpack_subgraph(g: Any, packed: Any, rows: int, length: int) -> Any:
    """Standard ops turning (rows, nbytes) uint8 into (rows, length) float +-1."""
    shifts = g.op("Constant", value_t=torch.arange(8, dtype=torch.uint8))
    one = g.op("Constant", value_t=torch.tensor(1, dtype=torch.uint8))
    axes = g.op("Constant", value_t=torch.tensor([2], dtype=torch.int64))
    bits = g.op("Unsqueeze", packed, axes)  # (rows, nbytes, 1)
    bits = g.op("BitShift", bits, shifts, direction_s="RIGHT")  # (rows, nbytes, 8), LSB first
    bits = g.op("BitwiseAnd", bits, one)
    bits = g.op("Cast", bits, to_i=onnx.TensorProto.FLOAT)
    # bit 1 -> -1, bit 0 -> +1
    values = g.op(
        "Sub",
        g.op("Constant", value_t=torch.tensor(1.0)),
        g.op("Mul", bits, g.op("Constant", value_t=torch.tensor(2.0))),
    )
    values = g.op("Reshape", values, g.op("Constant", value_t=torch.tensor([rows, -1])))
    return g.op(
        "Slice",
        values,
        g.op("Constant", value_t=torch.tensor([0])),
        g.op("Constant", value_t=torch.tensor([length])),
        g.op("Constant", value_t=torch.tensor([1])),
    )


def _sign_subgraph(g: Any, x: Any) -> Any:
    """Sign with sign(0) = +1 as Where(x < 0, -1, 1)."""
    negative = g.op("Less", x, g.op("Constant", value_t=torch.tensor(0.0)))
    return g.op(
        "Where",
        negative,
        g.op("Constant", value_t=torch.tensor(-1.0)),
        g.op("Constant", value_t=torch.tensor(1.0)),
    )


def _scale_bias_subgraph(g: Any, y: Any, multiplier: Any, bias: Any, dims: int) -> Any:
    shape = torch.tensor([1, -1] + [1] * (dims - 2))
    shape_const = g.op("Constant", value_t=shape)
    y = g.op("Mul", y, g.op("Reshape", multiplier, shape_const))
    return g.op("Add", y, g.op("Reshape", bias, shape_const))


def _conv_out_sizes(x: Any, attrs: dict[str, Any]) -> list[int | None]:
    """Output sizes of a binary conv node, for the exporter's shape inference."""
    sizes = x.type().sizes()
    cout, _, kh, kw = attrs["shape"]
    if sizes is None:
        return [None, cout, None, None]
    top, left, bottom, right = attrs["pads"]
    (sh, sw), (dh, dw) = attrs["strides"], attrs["dilations"]
    out_h = (sizes[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (sizes[3] + left + right - dw * (kw - 1) - 1) // sw + 1
    return [sizes[0], cout, out_h, out_w]


class _BinaryConvFn(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        x: torch.Tensor,
        packed: torch.Tensor,
        multiplier: torch.Tensor,
        bias: torch.Tensor,
        signs: torch.Tensor,
        attrs: dict[str, Any],
    ) -> torch.Tensor:
        top, left, bottom, right = attrs["pads"]
        if attrs["binary_input"]:
            x = F.pad(_sign(x.clone()), (left, right, top, bottom), value=1.0)
        else:
            x = F.pad(x, (left, right, top, bottom), value=0.0)
        y = F.conv2d(x, signs, None, attrs["strides"], 0, attrs["dilations"])
        return y * multiplier.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)

    @staticmethod
    def symbolic(g: Any, x, packed, multiplier, bias, signs, attrs):  # noqa: ANN001, ANN205, D102
        cout, cin, kh, kw = attrs["shape"]
        if attrs["flavour"] == "onnx" and attrs["binary_input"]:
            y = g.op(
                f"{CUSTOM_DOMAIN}::BinaryConv2d",
                x,
                packed,
                multiplier,
                bias,
                in_channels_i=cin,
                kernel_shape_i=[kh, kw],
                strides_i=list(attrs["strides"]),
                pads_i=list(attrs["pads"]),
                dilations_i=list(attrs["dilations"]),
            )
            y.setType(x.type().with_sizes(_conv_out_sizes(x, attrs)))
            return y
        # portable: unpack (Cout, kh*kw*Cin) in (kh, kw, Cin) order, back to (Cout, Cin, kh, kw)
        flat = _unpack_subgraph(g, packed, cout, kh * kw * cin)
        weight = g.op("Reshape", flat, g.op("Constant", value_t=torch.tensor([cout, kh, kw, cin])))
        weight = g.op("Transpose", weight, perm_i=[0, 3, 1, 2])
        top, left, bottom, right = attrs["pads"]
        if attrs["binary_input"]:
            x = _sign_subgraph(g, x)
            pads = torch.tensor([0, 0, top, left, 0, 0, bottom, right], dtype=torch.int64)
            x = g.op(
                "Pad",
                x,
                g.op("Constant", value_t=pads),
                g.op("Constant", value_t=torch.tensor(1.0)),
                mode_s="constant",
            )
            conv = g.op(
                "Conv",
                x,
                weight,
                strides_i=list(attrs["strides"]),
                dilations_i=list(attrs["dilations"]),
                kernel_shape_i=[kh, kw],
            )
        else:
            conv = g.op(
                "Conv",
                x,
                weight,
                strides_i=list(attrs["strides"]),
                dilations_i=list(attrs["dilations"]),
                pads_i=[top, left, bottom, right],
                kernel_shape_i=[kh, kw],
            )
        return _scale_bias_subgraph(g, conv, multiplier, bias, 4)


class _BinaryDenseFn(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        x: torch.Tensor,
        packed: torch.Tensor,
        multiplier: torch.Tensor,
        bias: torch.Tensor,
        signs: torch.Tensor,
        attrs: dict[str, Any],
    ) -> torch.Tensor:
        if attrs["binary_input"]:
            x = _sign(x.clone())
        return F.linear(x, signs) * multiplier + bias

    @staticmethod
    def symbolic(g: Any, x, packed, multiplier, bias, signs, attrs):  # noqa: ANN001, ANN205, D102
        cout, cin = attrs["shape"]
        if attrs["flavour"] == "onnx" and attrs["binary_input"]:
            y = g.op(
                f"{CUSTOM_DOMAIN}::BinaryDense", x, packed, multiplier, bias, in_features_i=cin
            )
            sizes = x.type().sizes() if x.type().sizes() is not None else [None, None]
            y.setType(x.type().with_sizes([sizes[0], cout]))
            return y
        weight = _unpack_subgraph(g, packed, cout, cin)
        if attrs["binary_input"]:
            x = _sign_subgraph(g, x)
        y = g.op("Gemm", x, weight, transB_i=1)
        return _scale_bias_subgraph(g, y, multiplier, bias, 2)


class _ExportedBinaryLayer(nn.Module):
    """Stand-in for a binary layer during export: packed weights as buffers."""

    def __init__(self, name: str, layer: BinaryConv2d | BinaryLinear, flavour: str) -> None:
        super().__init__()
        _check_quantizers(name, layer)
        scale, signs = _scale_and_signs(layer)
        weight = signs.numpy()
        is_conv = isinstance(layer, BinaryConv2d)
        packed = pack_conv_weight(weight) if is_conv else pack_linear_weight(weight)
        self.register_buffer("packed_weight", torch.from_numpy(packed))
        self.register_buffer("multiplier", scale.float().contiguous())
        bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(len(scale))
        self.register_buffer("bias", bias.contiguous())
        self.register_buffer("signs", signs)
        self.is_conv = is_conv
        self.attrs: dict[str, Any] = {
            "flavour": flavour,
            "binary_input": layer.input_quantizer is not None,
            "shape": tuple(weight.shape),
        }
        if is_conv:
            if layer.groups != 1:
                raise ExportError(f"layer '{name}': grouped binary convolutions are not exported")
            left, right, top, bottom = layer.one_padding
            self.attrs.update(
                pads=(top, left, bottom, right),
                strides=tuple(layer.stride),
                dilations=tuple(layer.dilation),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = _BinaryConvFn if self.is_conv else _BinaryDenseFn
        return fn.apply(x, self.packed_weight, self.multiplier, self.bias, self.signs, self.attrs)


def _export_twin(model: nn.Module, flavour: str) -> nn.Module:
    """A copy of ``model`` with binary-weight layers replaced by their exported form."""
    twin = copy.deepcopy(model).eval()
    for name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if isinstance(child, BinaryConv2d | BinaryLinear):
                if child.kernel_quantizer is None:
                    # a float layer in binary-layer clothing: export as its float base
                    base: nn.Module
                    if isinstance(child, BinaryConv2d):
                        if child.input_quantizer is not None:
                            raise ExportError(
                                f"layer '{path}' binarizes inputs but not weights; "
                                "the writer exports only layers with binary weights"
                            )
                        base = nn.Conv2d(
                            child.in_channels,
                            child.out_channels,
                            child.kernel_size,
                            child.stride,
                            child.padding,
                            child.dilation,
                            child.groups,
                            child.bias is not None,
                        )
                    else:
                        base = nn.Linear(
                            child.in_features, child.out_features, child.bias is not None
                        )
                    base.load_state_dict(child.state_dict())
                    setattr(module, child_name, base)
                else:
                    setattr(module, child_name, _ExportedBinaryLayer(path, child, flavour))
    _check_known_leaves(twin)
    return twin


def _check_known_leaves(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _ExportedBinaryLayer) or next(module.children(), None) is not None:
            continue
        if isinstance(module, Quantizer):
            continue  # quantizers of float layers: parameter-free, nothing to export
        if not isinstance(module, _KNOWN_LEAVES):
            raise ExportError(
                f"cannot export layer '{name}' of type {type(module).__name__}: the ONNX writer "
                "does not know it. Known layers: BinaryConv2d, BinaryLinear, "
                + ", ".join(sorted(t.__name__ for t in _KNOWN_LEAVES))
            )


def to_onnx(model: nn.Module, input_shape: Sequence[int], flavour: str) -> onnx.ModelProto:
    """Export ``model`` (eval mode) to an in-memory ONNX model of the given flavour.

    ``input_shape`` is (C, H, W) or (N, C, H, W); the batch dimension is dynamic.
    """
    if flavour not in FORMATS:
        raise ExportError(f"unknown format {flavour!r}; use one of {', '.join(FORMATS)}")
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    twin = _export_twin(model, flavour)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            twin,
            (torch.zeros(shape),),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            custom_opsets={CUSTOM_DOMAIN: CUSTOM_DOMAIN_VERSION} if flavour == "onnx" else None,
            do_constant_folding=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    _constants_to_initializers(proto)
    _inline_initializer_identities(proto)
    if flavour == "onnx":
        from .onnx_fusion import fuse_binary_epilogues

        fuse_binary_epilogues(proto)
    _prune_unused_initializers(proto)
    proto.producer_name = "bitfleet"
    if flavour == "onnx-portable":
        onnx.checker.check_model(proto, full_check=True)
    else:
        onnx.checker.check_model(proto)
    return proto


def _constants_to_initializers(proto: onnx.ModelProto) -> None:
    """Turn ``Constant`` nodes holding tensors into initializers (where packed weights belong)."""
    graph = proto.graph
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain == "" and len(node.attribute) == 1:
            attr = node.attribute[0]
            if attr.name == "value":
                tensor = onnx.TensorProto()
                tensor.CopyFrom(attr.t)
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _inline_initializer_identities(proto: onnx.ModelProto) -> None:
    """Drop ``Identity`` nodes that only alias an initializer.

    The exporter deduplicates equal tensors that way; rewrites need each parameter to be an
    initializer.
    """
    graph = proto.graph
    inits = {init.name for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    keep = []
    for node in graph.node:
        source = alias.get(node.input[0], node.input[0]) if node.input else ""
        if node.op_type == "Identity" and source in inits and node.output[0] not in outputs:
            alias[node.output[0]] = source
            continue
        keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)


def _prune_unused_initializers(proto: onnx.ModelProto) -> None:
    graph = proto.graph
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name in used or i.name == "input"]
    del graph.input[:]
    graph.input.extend(inputs)
