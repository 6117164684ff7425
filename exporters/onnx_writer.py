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

The writer asks each quantizer what it needs (``binary``, ``per_channel_scale``, ``factorize``:
see :class:`models.quantizers.Quantizer`) and never names quantizer classes, so a newly
registered quantizer exports without a change here. The custom domain, op names, formats,
padding order and sign convention come from :mod:`exporters.conventions`.

Layers that are not binary (the first conv, 1x1 downsampling convs, batch norm, pooling,
the classifier) are exported by ``torch.onnx.export`` as usual. AW-convolutions
(:class:`models.attention.AWConv2d`) have per-sample real weights: :mod:`exporters.onnx_attention`
writes them as standard float ops in both flavours. Fake-quantised int8/int4 layers
(:class:`models.quantized.QuantConv2d`, ``QuantLinear``) become standard QuantizeLinear /
DequantizeLinear nodes around a float Conv / Gemm with int8 weight initializers
(:mod:`exporters.onnx_quantized`), in both flavours too. The writer refuses modules it
does not know rather than exporting something it cannot vouch for.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from bitfleet.errors import BitfleetError
from models import quantizers
from models.layers import AWConv2d, BinaryConv2d, BinaryLinear
from models.nasb import Zero
from models.quantized import QuantConv2d, QuantLinear
from models.quantizers import Quantizer, sign

from .conventions import (
    BINARY_CONV_OP,
    BINARY_DENSE_OP,
    CUSTOM_DOMAIN,
    CUSTOM_DOMAIN_VERSION,
    FORMAT_FAST,
    FORMAT_PORTABLE,
    FORMAT_TENSORRT,
    FORMAT_TRT,
    FORMATS,
    ONNX_FORMATS,
    conv_output_size,
    onnx_pads,
)
from .packing import pack_conv_weight, pack_linear_weight

__all__ = ["ExportError", "FORMATS", "CUSTOM_DOMAIN", "OPSET", "to_onnx"]

OPSET = 18

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
    Zero,  # NASB's "none" op: a strided slice times 0, standard ops
)


class ExportError(BitfleetError, ValueError):
    """A model the writer cannot export faithfully."""


# --- what the writer asks of quantizers (their declared interface, never their class) ------


def _exportable_quantizers(for_inputs: bool) -> str:
    """Names of the registered quantizers the writer exports, for error messages."""
    names = []
    for name in quantizers.list_quantizers():
        try:
            q = quantizers.get(name)
        except (TypeError, ValueError):  # needs arguments: leave it out of the hint
            continue
        if isinstance(q, Quantizer) and q.binary and not (for_inputs and q.per_channel_scale):
            names.append(name)
    return ", ".join(names)


def _check_input_quantizer(name: str, layer: BinaryConv2d | BinaryLinear) -> None:
    """Binarized inputs must be plain sign(x), sign(0) = +1: the exported graph computes that."""
    iq = layer.input_quantizer
    if iq is None:
        return
    exportable = isinstance(iq, Quantizer) and iq.binary and not iq.per_channel_scale
    if exportable:  # hold the declaration to account on values around the threshold
        probe = torch.tensor([-2.0, -0.5, -0.0, 0.0, 0.5, 2.0]).view(1, 6)
        if isinstance(layer, BinaryConv2d):
            probe = probe.view(1, 6, 1, 1)
        with torch.no_grad():
            exportable = torch.equal(iq(probe), sign(probe))
    if not exportable:
        raise ExportError(
            f"layer '{name}' uses input quantizer {type(iq).__name__}, which the writer cannot "
            "export: binarized inputs need a quantizer declared `binary` (sign(x) with "
            "sign(0) = +1) without a per-channel scale; registered ones: "
            + _exportable_quantizers(for_inputs=True)
        )


def _binary_factors(
    name: str, layer: BinaryConv2d | BinaryLinear
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight as ``(signs, scale)``: +-1 values and one multiplier per channel."""
    kq = layer.kernel_quantizer
    weight = layer.weight.detach().float()
    values: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    if isinstance(kq, Quantizer) and kq.binary:
        with torch.no_grad():
            values, scale = kq.factorize(weight)
    if values is None or not bool((values.abs() == 1).all()):
        raise ExportError(
            f"layer '{name}' uses kernel quantizer {type(kq).__name__}, which the writer cannot "
            "export: it must be declared `binary` and factorize weights into +-1 values and an "
            "optional per-channel scale; registered ones: "
            + _exportable_quantizers(for_inputs=False)
        )
    cout = weight.shape[0]
    if scale is None:
        scale = torch.ones(cout)
    elif scale.numel() != cout:
        raise ExportError(
            f"layer '{name}': kernel quantizer {type(kq).__name__} gives {scale.numel()} scales "
            f"for {cout} output channels"
        )
    return values.float().contiguous(), scale.detach().float().reshape(cout).contiguous()


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
    # bit 1 -> -1, bit 0 -> +1: exporters.conventions.bit_value, 1 - 2 * bit
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
    """:func:`exporters.conventions.sign` in standard ops: Where(x < 0, -1, 1)."""
    negative = g.op("Less", x, g.op("Constant", value_t=torch.tensor(0.0)))
    return g.op(
        "Where",
        negative,
        g.op("Constant", value_t=torch.tensor(-1.0)),
        g.op("Constant", value_t=torch.tensor(1.0)),
    )


def _channel_shape(dims: int) -> list[int]:
    """Shape that broadcasts a per-channel vector over an (N, C, ...) tensor of ``dims`` axes."""
    return [1, -1] + [1] * (dims - 2)


def _scale_bias_subgraph(g: Any, y: Any, multiplier: Any, bias: Any, dims: int) -> Any:
    shape = torch.tensor(_channel_shape(dims))
    shape_const = g.op("Constant", value_t=shape)
    y = g.op("Mul", y, g.op("Reshape", multiplier, shape_const))
    return g.op("Add", y, g.op("Reshape", bias, shape_const))


def _conv_out_sizes(x: Any, attrs: dict[str, Any]) -> list[int | None]:
    """Output sizes of a binary conv node, for the exporter's shape inference."""
    sizes = x.type().sizes()
    cout, _, kh, kw = attrs["shape"]
    if sizes is None:
        return [None, cout, None, None]
    left, right, top, bottom = attrs["padding"]
    (sh, sw), (dh, dw) = attrs["strides"], attrs["dilations"]
    out_h = conv_output_size(sizes[2], kh, sh, (top, bottom), dh)
    out_w = conv_output_size(sizes[3], kw, sw, (left, right), dw)
    return [sizes[0], cout, out_h, out_w]


def _conv_forward(x: torch.Tensor, signs: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    if attrs["binary_input"]:
        x = F.pad(sign(x), attrs["padding"], value=1.0)
    else:
        x = F.pad(x, attrs["padding"], value=0.0)
    return F.conv2d(x, signs, None, attrs["strides"], 0, attrs["dilations"])


def _dense_forward(x: torch.Tensor, signs: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    return F.linear(sign(x) if attrs["binary_input"] else x, signs)


def _unit_qdq(g: Any, x: Any) -> Any:
    """QuantizeLinear + DequantizeLinear at scale 1, zero point 0: +-1 values marked int8.

    For TensorRT's explicit quantization: the convolution that reads this runs in int8 with
    int32 accumulation, exact for +-1 operands; any other runtime computes the same values.
    """
    scale = g.op("Constant", value_t=torch.tensor(1.0))
    zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero), scale, zero)


def _int8_weights(g: Any, weights: Any) -> Any:
    """DequantizeLinear of the int8 +-1 weight initializer (scale 1, zero point 0)."""
    scale = g.op("Constant", value_t=torch.tensor(1.0))
    zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
    return g.op("DequantizeLinear", weights, scale, zero)


def _conv_symbolic(g: Any, x: Any, packed: Any, multiplier: Any, bias: Any, attrs: Any) -> Any:
    cout, cin, kh, kw = attrs["shape"]
    pads = list(onnx_pads(attrs["padding"]))
    geometry = {
        "strides_i": list(attrs["strides"]),
        "dilations_i": list(attrs["dilations"]),
        "kernel_shape_i": [kh, kw],
    }
    if attrs["flavour"] == FORMAT_FAST and attrs["binary_input"]:
        y = g.op(
            f"{CUSTOM_DOMAIN}::{BINARY_CONV_OP}",
            x,
            packed,
            multiplier,
            bias,
            in_channels_i=cin,
            pads_i=pads,
            **geometry,
        )
        y.setType(x.type().with_sizes(_conv_out_sizes(x, attrs)))
        return y
    if attrs["flavour"] == FORMAT_TRT:  # `packed` is the int8 (Cout, Cin, kh, kw) weight here
        weight = _int8_weights(g, packed)
    else:  # portable: unpack (Cout, kh*kw*Cin) in (kh, kw, Cin) order to (Cout, Cin, kh, kw)
        flat = _unpack_subgraph(g, packed, cout, kh * kw * cin)
        shape = g.op("Constant", value_t=torch.tensor([cout, kh, kw, cin]))
        weight = g.op("Transpose", g.op("Reshape", flat, shape), perm_i=[0, 3, 1, 2])
    if attrs["binary_input"]:
        # pad with +1 after the sign: ONNX Pad takes (N, C, H, W) starts, then ends
        starts, ends = pads[:2], pads[2:]
        pad_spec = torch.tensor([0, 0, *starts, 0, 0, *ends], dtype=torch.int64)
        x = g.op(
            "Pad",
            _sign_subgraph(g, x),
            g.op("Constant", value_t=pad_spec),
            g.op("Constant", value_t=torch.tensor(1.0)),
            mode_s="constant",
        )
        if attrs["flavour"] == FORMAT_TRT:
            x = _unit_qdq(g, x)
        conv = g.op("Conv", x, weight, **geometry)
    else:
        conv = g.op("Conv", x, weight, pads_i=pads, **geometry)
    return _scale_bias_subgraph(g, conv, multiplier, bias, 4)


def _dense_symbolic(g: Any, x: Any, packed: Any, multiplier: Any, bias: Any, attrs: Any) -> Any:
    cout, cin = attrs["shape"]
    if attrs["flavour"] == FORMAT_FAST and attrs["binary_input"]:
        y = g.op(
            f"{CUSTOM_DOMAIN}::{BINARY_DENSE_OP}", x, packed, multiplier, bias, in_features_i=cin
        )
        sizes = x.type().sizes() if x.type().sizes() is not None else [None, None]
        y.setType(x.type().with_sizes([sizes[0], cout]))
        return y
    if attrs["flavour"] == FORMAT_TRT:  # `packed` is the int8 (Cout, Cin) weight here
        weight = _int8_weights(g, packed)
        if attrs["binary_input"]:
            x = _unit_qdq(g, _sign_subgraph(g, x))
        y = g.op("Gemm", x, weight, transB_i=1)
        return _scale_bias_subgraph(g, y, multiplier, bias, 2)
    weight = _unpack_subgraph(g, packed, cout, cin)
    if attrs["binary_input"]:
        x = _sign_subgraph(g, x)
    y = g.op("Gemm", x, weight, transB_i=1)
    return _scale_bias_subgraph(g, y, multiplier, bias, 2)


class _BinaryLayerFn(torch.autograd.Function):
    """A packed binary conv or dense layer: torch computes it, ``symbolic`` emits its nodes."""

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
        layer_forward = _conv_forward if attrs["is_conv"] else _dense_forward
        y = layer_forward(x, signs, attrs)
        channels = _channel_shape(y.dim())
        return y * multiplier.view(channels) + bias.view(channels)

    @staticmethod
    def symbolic(g: Any, x, packed, multiplier, bias, signs, attrs):  # noqa: ANN001, ANN205, D102
        layer_symbolic = _conv_symbolic if attrs["is_conv"] else _dense_symbolic
        return layer_symbolic(g, x, packed, multiplier, bias, attrs)


class _ExportedBinaryLayer(nn.Module):
    """Stand-in for a binary layer during export: packed weights as buffers."""

    def __init__(self, name: str, layer: BinaryConv2d | BinaryLinear, flavour: str) -> None:
        super().__init__()
        _check_input_quantizer(name, layer)
        signs, scale = _binary_factors(name, layer)
        weight = signs.numpy()
        is_conv = isinstance(layer, BinaryConv2d)
        packed = pack_conv_weight(weight) if is_conv else pack_linear_weight(weight)
        # the TensorRT flavour stores int8 +-1 weights (its parser reads no bit unpacking)
        stored = signs.to(torch.int8) if flavour == FORMAT_TRT else torch.from_numpy(packed)
        self.register_buffer("packed_weight", stored)
        self.register_buffer("multiplier", scale)
        bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(len(scale))
        self.register_buffer("bias", bias.contiguous())
        self.register_buffer("signs", signs)
        self.attrs: dict[str, Any] = {
            "is_conv": is_conv,
            "flavour": flavour,
            "binary_input": layer.input_quantizer is not None,
            "shape": tuple(weight.shape),
        }
        if isinstance(layer, BinaryConv2d):
            if layer.groups != 1:
                raise ExportError(f"layer '{name}': grouped binary convolutions are not exported")
            self.attrs.update(
                padding=tuple(layer.one_padding),  # (left, right, top, bottom)
                strides=tuple(layer.stride),
                dilations=tuple(layer.dilation),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BinaryLayerFn.apply(
            x, self.packed_weight, self.multiplier, self.bias, self.signs, self.attrs
        )


def _export_twin(model: nn.Module, flavour: str) -> nn.Module:
    """A copy of ``model`` with binary-weight layers replaced by their exported form."""
    from .onnx_attention import ExportedAWConv  # it builds on this module's helpers
    from .onnx_quantized import ExportedQuantLayer

    twin = copy.deepcopy(model).eval()
    for name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if isinstance(child, AWConv2d):
                setattr(module, child_name, ExportedAWConv(path, child))
            elif isinstance(child, QuantConv2d | QuantLinear):
                setattr(module, child_name, ExportedQuantLayer(path, child))
            elif isinstance(child, BinaryConv2d | BinaryLinear):
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
    from .onnx_attention import ExportedAWConv
    from .onnx_quantized import ExportedQuantLayer

    for name, module in model.named_modules():
        exported = isinstance(module, _ExportedBinaryLayer | ExportedAWConv | ExportedQuantLayer)
        if exported or next(module.children(), None) is not None:
            continue
        if isinstance(module, Quantizer):
            continue  # quantizers of float layers: parameter-free, nothing to export
        if isinstance(module, QuantConv2d | QuantLinear):  # only a root layer escapes the swap
            raise ExportError(
                f"cannot export the {type(module).__name__} '{name}' on its own: the writer "
                "replaces quantised layers inside a network; wrap it in nn.Sequential"
            )
        if not isinstance(module, _KNOWN_LEAVES):
            raise ExportError(
                f"cannot export layer '{name}' of type {type(module).__name__}: the ONNX writer "
                "does not know it. Known layers: AWConv2d, BinaryConv2d, BinaryLinear, "
                "QuantConv2d, QuantLinear, " + ", ".join(sorted(t.__name__ for t in _KNOWN_LEAVES))
            )


def to_onnx(model: nn.Module, input_shape: Sequence[int], flavour: str) -> onnx.ModelProto:
    """Export ``model`` (eval mode) to an in-memory ONNX model of the given flavour.

    ``input_shape`` is (C, H, W) or (N, C, H, W); the batch dimension is dynamic.
    """
    if flavour not in ONNX_FORMATS:
        raise ExportError(f"unknown format {flavour!r}; use one of {', '.join(ONNX_FORMATS)}")
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    twin = _export_twin(model, flavour)
    custom_opsets = {CUSTOM_DOMAIN: CUSTOM_DOMAIN_VERSION} if flavour == FORMAT_FAST else None
    opset = opset_of(flavour)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            twin,
            (torch.zeros(shape),),
            # torch annotates f as a path only; the TorchScript exporter (dynamo=False) also
            # writes to a file-like object, as its own comments say
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            custom_opsets=custom_opsets,
            do_constant_folding=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    _constants_to_initializers(proto)
    _inline_initializer_identities(proto)
    if flavour == FORMAT_FAST:
        from .onnx_fusion import fuse_binary_epilogues

        fuse_binary_epilogues(proto)
    if flavour == FORMAT_TRT:
        _fold_constants(proto)
    _prune_unused_initializers(proto)
    proto.producer_name = "bitfleet"
    if flavour == FORMAT_TRT:
        from .tensorrt_ops import tensorrt_problems

        problems = tensorrt_problems(proto)
        if problems:
            raise ExportError(
                f"this network cannot be written as {FORMAT_TRT}: {'; '.join(problems)}; "
                f"export it as {FORMAT_PORTABLE} for other runtimes"
            )
    if flavour in (FORMAT_PORTABLE, FORMAT_TRT):
        onnx.checker.check_model(proto, full_check=True)
    else:
        onnx.checker.check_model(proto)
    return proto


def opset_of(flavour: str) -> int:
    """The default-domain opset a flavour is written in (TensorRT's parsers read up to 17)."""
    from .tensorrt_ops import TENSORRT_MAX_OPSET

    return TENSORRT_MAX_OPSET if flavour in (FORMAT_TRT, FORMAT_TENSORRT) else OPSET


_NOT_FOLDED = ("QuantizeLinear", "DequantizeLinear")
"""Kept as nodes: the DequantizeLinear of an int8 weight is what marks it int8 for TensorRT."""


def _fold_constants(proto: onnx.ModelProto) -> None:
    """Evaluate every node whose inputs are all initializers; its outputs become initializers.

    The TorchScript exporter computes some pads and slice bounds at run time from constants
    (NASB's reduction cells), and TensorRT's parser wants such inputs as initializers; Reshapes
    of per-channel scales fold too. Quantize/Dequantize nodes stay (see ``_NOT_FOLDED``).
    Evaluation is onnx's reference implementation, node by node, in topological order.
    """
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    opset = opset_of(FORMAT_TRT)
    keep = []
    for node in graph.node:
        inputs = [name for name in node.input if name]
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NOT_FOLDED
            and all(name in values for name in inputs)
        )
        if not foldable:
            keep.append(node)
            continue
        single = onnx.helper.make_model(
            onnx.helper.make_graph(
                [node],
                "fold",
                [onnx.helper.make_tensor_value_info(n, 0, None) for n in inputs],
                [onnx.helper.make_empty_tensor_value_info(n) for n in node.output],
            ),
            opset_imports=[onnx.helper.make_opsetid("", opset)],
        )
        results = ReferenceEvaluator(single).run(None, {n: values[n] for n in inputs})
        for name, value in zip(node.output, results, strict=True):
            array = np.asarray(value)
            values[name] = array
            graph.initializer.append(numpy_helper.from_array(array, name))
    del graph.node[:]
    graph.node.extend(keep)


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
