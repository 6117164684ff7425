"""Write a network as a ``.tflite`` flatbuffer, binary layers in exact int8 or float forms.

Converters do not serve binary networks: onnx2tf turns every binary convolution into a float
CONV_2D (44.8 MB for Bi-Real-18, with a transpose around each), and the PyTorch route fails
on the model. This writer translates bitfleet's ``onnx-trt`` graph, whose ops are few and
whose binary layers are explicit (``Less -> Where -> Pad(+1) -> Q/DQ(scale 1) -> Conv`` with
int8 +-1 weights through a DequantizeLinear), into TFLite builtin operators:

- Binary convolutions and dense layers take one of the exact forms of
  :mod:`exporters.tflite_binary`, chosen per layer (``binary_form``).
- Float layers become their TFLite twins; weights stored as int8 (``float_parts="int8"``)
  stay int8 in the file and are widened by a DEQUANTIZE that the interpreter folds at prepare.
- Batch norm is a MUL and an ADD in PyTorch's order ``x * a + b``; pooling with PyTorch's
  explicit or ceil-mode padding is a PADV2 and a VALID pool (average pools divide by a
  per-position count where PyTorch does not count the padding).

Layout: ONNX is NCHW, TFLite's convolutions are NHWC. The model takes the manifest's NCHW
input and transposes it once; every 4-D tensor inside is NHWC, constants are transposed at
export, and a flatten of a spatial map transposes back so a classifier's weight order is
unchanged. The batch dimension is dynamic (``shape_signature`` -1).

An ONNX op without a translation here is refused by name, before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .conventions import conv_output_size, pool_extra_padding
from .numpy_ops import average_pool_counts
from .onnx_writer import ExportError
from .tflite_binary import BINARY_FORMS, channel_groups, choose_form
from .tflite_builder import Quant, TFLiteGraph

__all__ = ["TFLITE_FILE", "to_tflite", "TFLITE_OPS"]

TFLITE_FILE = "model.tflite"

_NHWC = (0, 2, 3, 1)
_NCHW = (0, 3, 1, 2)
_LOWEST = float(np.finfo(np.float32).min)


@dataclass
class _Value:
    """A graph value in TFLite: its tensor and its ONNX (NCHW) shape at batch 1."""

    index: int
    shape: tuple[int, ...]

    @property
    def spatial(self) -> bool:
        return len(self.shape) == 4


@dataclass
class _Binary:
    """A binary layer found in the ONNX graph: the float input it binarises and its weights."""

    source: str
    pads: tuple[int, int, int, int]  # ONNX spatial order (top, left, bottom, right)
    weights: np.ndarray  # int8 +-1, ONNX layout
    absorbed: list[onnx.NodeProto] = field(default_factory=list)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _equals(array: np.ndarray | None, number: float) -> bool:
    """Whether ``array`` is a known one-element constant equal to ``number``."""
    return array is not None and array.size == 1 and float(array.reshape(())) == number


def _nhwc(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(shape[i] for i in _NHWC) if len(shape) == 4 else tuple(shape)


class _Translator:
    """One pass over the (topologically sorted) ONNX graph, emitting TFLite operators."""

    def __init__(self, proto: onnx.ModelProto, binary_form: str) -> None:
        self.graph = proto.graph
        self.binary_form = binary_form
        self.out = TFLiteGraph(description="bitfleet binary network")
        self.inits = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.values: dict[str, _Value] = {}
        self.layers: list[dict[str, Any]] = []
        self._signs: dict[tuple[str, str, tuple[int, ...]], int] = {}
        self._shared: dict[tuple[Any, ...], int] = {}

    # --- constants ------------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is known at export (initializer, or dequantized one)."""
        if name in self.inits:
            return self.inits[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[0] in self.inits:
            q, scale = self.inits[node.input[0]], self.inits[node.input[1]]
            zero = self.inits[node.input[2]] if len(node.input) > 2 else np.zeros((), q.dtype)
            axis = int(_attrs(node).get("axis", 1))
            if scale.ndim:
                shape = [1] * q.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            return ((q.astype(np.float32) - zero.astype(np.float32)) * scale).astype(np.float32)
        if node is not None and node.op_type == "Identity":
            return self.const(node.input[0])
        return None

    def stored_weights(self, name: str) -> tuple[np.ndarray, Quant | None] | None:
        """Weights as stored: ``(int8, quant)`` behind a DequantizeLinear, ``(float, None)``."""
        if name in self.inits:
            return self.inits[name].astype(np.float32), None
        node = self.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in self.inits:
            return None
        q = self.inits[node.input[0]]
        zero = self.inits[node.input[2]] if len(node.input) > 2 else np.zeros(1, q.dtype)
        if q.dtype != np.int8 or np.any(zero):
            return None
        scale = self.inits[node.input[1]].reshape(-1)
        axis = int(_attrs(node).get("axis", 1)) if scale.size > 1 else 0
        return q, Quant(tuple(float(s) for s in scale), (0,) * scale.size, axis)

    def shared(self, name: str, array: np.ndarray, quant: Quant | None = None) -> int:
        """A constant tensor holding ``array``, written once however many operators read it."""
        values = np.asarray(array)
        key = (values.dtype.str, values.shape, values.tobytes(), quant)
        if key not in self._shared:
            self._shared[key] = self.out.constant(name, values, quant=quant)
        return self._shared[key]

    def scalar(self, value: float, dtype: str = "float32") -> int:
        """A shared one-element constant (thresholds, pad values, axes)."""
        return self.shared(f"const_{dtype}_{value:g}", np.array(value, dtype=dtype))

    def layout_const(self, array: np.ndarray, like: _Value) -> int:
        """An elementwise operand broadcast against ``like``, in ``like``'s TFLite layout."""
        a = np.asarray(array, dtype=np.float32)
        if like.spatial and a.ndim:
            a = a.reshape((1,) * (4 - a.ndim) + a.shape).transpose(_NHWC)
        return self.out.constant("const", a)

    # --- emitting helpers -----------------------------------------------------------------
    def new(self, name: str, shape: Sequence[int], dtype: str = "float32", **kw: Any) -> int:
        return self.out.tensor(name, _nhwc(shape), dtype, **kw)

    def emit(self, op: str, inputs: list[int], out: int, options: Any = None, **kw: Any) -> int:
        self.out.op(op, inputs, [out], options, **kw)
        return out

    def pad(
        self, x: int, shape: Sequence[int], pads: Sequence[int], value: int, name: str
    ) -> tuple[int, tuple[int, ...]]:
        """PADV2 of a 4-D NHWC tensor by ONNX spatial pads (top, left, bottom, right)."""
        top, left, bottom, right = (int(p) for p in pads)
        if not any((top, left, bottom, right)):
            return x, tuple(shape)
        n, c, h, w = shape
        padded = (n, c, h + top + bottom, w + left + right)
        table = self.out.constant(
            "pads", np.array([[0, 0], [top, bottom], [left, right], [0, 0]], np.int32)
        )
        dtype = self.out.dtype(x)
        y = self.new(name, padded, dtype, quant=self.out.quant(x))
        return self.emit("PADV2", [x, table, value], y), padded

    # --- the walk ---------------------------------------------------------------------------
    def run(self) -> bytes:
        binaries = self.find_binary_layers()
        skipped = {id(n) for b in binaries.values() for n in b.absorbed}
        (graph_input,) = [i for i in self.graph.input if i.name not in self.inits]
        dims = graph_input.type.tensor_type.shape.dim
        shape = tuple([1] + [int(d.dim_value) for d in dims[1:]])
        raw = self.out.tensor("input", shape, signature=[-1, *shape[1:]])
        self.out.inputs = [raw]
        value = raw
        if len(shape) == 4:
            perm = self.out.constant("perm_nhwc", np.array(_NHWC, np.int32))
            value = self.emit("TRANSPOSE", [raw, perm], self.new("input_nhwc", shape))
        self.values[graph_input.name] = _Value(value, shape)
        for node in self.graph.node:
            if id(node) in skipped:
                continue
            if id(node) in binaries:
                self.values[node.output[0]] = self.binary_layer(node, binaries[id(node)])
                continue
            handler = _HANDLERS.get(node.op_type)
            if handler is None:
                raise ExportError(
                    f"the tflite writer has no translation for ONNX op {node.op_type} "
                    f"(node {node.name or node.output[0]}); export this model with --format "
                    "onnx-portable or onnx"
                )
            handler(self, node)
        outputs = []
        for output in self.graph.output:
            result = self.values[output.name]
            if result.spatial:
                perm = self.out.constant("perm_nchw", np.array(_NCHW, np.int32))
                index = self.emit(
                    "TRANSPOSE", [result.index, perm], self.out.tensor(output.name, result.shape)
                )
            else:
                index = result.index
            self.out.rename(index, output.name)
            outputs.append(index)
        self.out.outputs = outputs
        return self.out.finish()

    def value(self, name: str) -> _Value:
        if name not in self.values:
            raise ExportError(f"the tflite writer cannot compute {name!r} (not produced yet)")
        return self.values[name]

    # --- binary layers --------------------------------------------------------------------
    def find_binary_layers(self) -> dict[int, _Binary]:
        """Conv/Gemm nodes fed by ``Less -> Where(-1, 1) -> [Pad(1)] -> Q/DQ(1)`` and +-1 int8."""
        found: dict[int, _Binary] = {}
        for node in self.graph.node:
            if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
                continue
            if node.op_type == "Conv" and (
                int(_attrs(node).get("group", 1)) != 1 or any(_attrs(node).get("pads", []))
            ):
                continue
            if node.op_type == "Gemm" and (
                int(_attrs(node).get("transA", 0)) or not int(_attrs(node).get("transB", 0))
            ):
                continue
            match = self._binary_chain(node)
            if match is not None:
                found[id(node)] = match
        return found

    def _binary_chain(self, node: onnx.NodeProto) -> _Binary | None:
        stored = self.stored_weights(node.input[1])
        if stored is None or stored[1] is None or stored[1].scale != (1.0,):
            return None
        weights = stored[0]
        if not np.all(np.abs(weights) == 1):
            return None
        chain: list[onnx.NodeProto] = []

        def step(name: str, op: str) -> onnx.NodeProto | None:
            producer = self.producer.get(name)
            if producer is None or producer.op_type != op:
                return None
            chain.append(producer)
            return producer

        dq = step(node.input[0], "DequantizeLinear")
        q = step(dq.input[0], "QuantizeLinear") if dq is not None else None
        if dq is None or q is None or not (self._unit_qdq(q) and self._unit_qdq(dq)):
            return None
        pads = (0, 0, 0, 0)
        before = self.producer.get(q.input[0])
        if before is not None and before.op_type == "Pad":
            pad = step(q.input[0], "Pad")
            assert pad is not None
            value = self.const(pad.input[2]) if len(pad.input) > 2 else None
            table = self.const(pad.input[1])
            if not _equals(value, 1.0) or table is None or table.size != 8:
                return None
            if _attrs(pad).get("mode", b"constant") not in (b"constant", "constant"):
                return None
            if any(table[[0, 1, 4, 5]]):
                return None
            pads = (int(table[2]), int(table[3]), int(table[6]), int(table[7]))
            where = step(pad.input[0], "Where")
        else:
            where = step(q.input[0], "Where")
        if where is None or not (
            _equals(self.const(where.input[1]), -1.0) and _equals(self.const(where.input[2]), 1.0)
        ):
            return None
        less = step(where.input[0], "Less")
        if less is None or not _equals(self.const(less.input[1]), 0.0):
            return None
        weight_dq = self.producer.get(node.input[1])
        for link in chain:  # the chain must serve this layer alone
            for output in link.output:
                if any(r is not node and r not in chain for r in self.readers.get(output, [])):
                    return None
        if weight_dq is not None and len(self.readers.get(node.input[1], [])) == 1:
            chain.append(weight_dq)
        return _Binary(less.input[0], pads, weights.astype(np.int8), chain)

    def _unit_qdq(self, node: onnx.NodeProto) -> bool:
        scale = self.const(node.input[1])
        zero = self.inits.get(node.input[2]) if len(node.input) > 2 else None
        return (
            scale is not None
            and scale.size == 1
            and float(scale) == 1.0
            and zero is not None
            and zero.dtype == np.int8
            and not np.any(zero)
        )

    def signs(self, source: str, dtype: str, pads: tuple[int, int, int, int]) -> tuple[int, tuple]:
        """+-1 of ``source`` (sign(0) = +1) as ``dtype``, padded with +1; shared by readers.

        Signs are made in float and quantized (scale 1) for the int8 form: LiteRT's float
        LESS / SELECT_V2 / PADV2 and its QUANTIZE run about 8x faster than int8 SELECT_V2 and
        PADV2 on large maps.
        """
        x = self.value(source)
        key = (source, dtype, pads)
        shape = (
            x.shape[:2] + (x.shape[2] + pads[0] + pads[2], x.shape[3] + pads[1] + pads[3])
            if x.spatial
            else x.shape
        )
        if key in self._signs:
            return self._signs[key], shape
        if dtype == "int8":
            floats, _ = self.signs(source, "float32", pads)
            unit = Quant.per_tensor(1.0)
            signs = self.emit(
                "QUANTIZE", [floats], self.new("signs_int8", shape, "int8", quant=unit)
            )
        else:
            below = self.emit(
                "LESS", [x.index, self.scalar(0.0)], self.new("below", x.shape, "bool")
            )
            plus = self.scalar(1.0)
            signs = self.emit(
                "SELECT_V2", [below, self.scalar(-1.0), plus], self.new("signs", x.shape)
            )
            if x.spatial:
                signs, _ = self.pad(signs, x.shape, pads, plus, "signs_padded")
        self._signs[key] = signs
        return signs, shape

    def binary_layer(self, node: onnx.NodeProto, layer: _Binary) -> _Value:
        conv = node.op_type == "Conv"
        attrs = _attrs(node)
        weights = layer.weights
        taps = int(np.prod(weights.shape[2:])) if conv else 1
        channels = int(weights.shape[1])
        form = choose_form(self.binary_form, channels, taps)
        name = node.output[0]
        integer = form in ("int8", "int4")
        groups = channel_groups(channels, taps) if integer else [(channels, 0.0)]
        self.layers.append({"name": node.name or name, "form": form, "groups": len(groups)})
        signs, shape = self.signs(layer.source, "int8" if integer else "float32", layer.pads)
        out_shape = (
            self._conv_shape(shape, weights.shape, attrs, (0, 0, 0, 0))
            if conv
            else (shape[0], weights.shape[0])
        )
        if form == "float":
            stored = self.out.constant(
                "binary_weights", self._layout(weights, conv), "int8", quant=Quant.per_tensor(1.0)
            )
            widened = self.emit(
                "DEQUANTIZE",
                [stored],
                self.out.tensor("binary_weights_f32", self._layout_shape(weights.shape, conv)),
            )
            zero_bias = self.shared("bias", np.zeros(weights.shape[0], np.float32))
            result = self._linear(conv, signs, widened, zero_bias, out_shape, attrs, name)
        else:
            result = self._int8_binary(
                conv, signs, shape, weights, groups, out_shape, attrs, name, form
            )
        return _Value(result, out_shape)

    def _int8_binary(
        self,
        conv: bool,
        signs: int,
        shape: tuple[int, ...],
        weights: np.ndarray,
        groups: list[tuple[int, float]],
        out_shape: tuple[int, ...],
        attrs: dict[str, Any],
        name: str,
        storage: str,
    ) -> int:
        unit = Quant.per_tensor(1.0)
        axis = 3 if conv else 1
        parts = [signs]
        if len(groups) > 1:
            sizes = self.out.constant("split_sizes", np.array([g for g, _ in groups], np.int32))
            parts = []
            for count, _ in groups:
                part_shape = list(shape)
                part_shape[1] = count
                parts.append(self.new("signs_group", part_shape, "int8", quant=unit))
            self.out.op(
                "SPLIT_V",
                [signs, sizes, self.scalar(axis, "int32")],
                parts,
                self.out.options("SplitVOptions", numSplits=len(groups)),
                version=2,
            )
        partial_sums = []
        start = 0
        for part, (count, scale) in zip(parts, groups, strict=True):
            block = weights[:, start : start + count]
            start += count
            # scale 1 everywhere (one per tensor: per-channel parameters would cost 12 bytes a
            # channel a group), so the int32 sum is the +-1 dot product itself
            stored = self.out.constant(
                "binary_weights", self._layout(block, conv), storage, quant=unit
            )
            bias = self.shared("zero_bias", np.zeros(weights.shape[0], np.int32), unit)
            summed = self.new("partial_sum", out_shape, "int8", quant=Quant.per_tensor(scale))
            if conv:
                self.out.op(
                    "CONV_2D",
                    [part, stored, bias],
                    [summed],
                    self._conv_options(attrs, "VALID"),
                    version=3,
                )
            else:
                self.out.op(
                    "FULLY_CONNECTED",
                    [part, stored, bias],
                    [summed],
                    self.out.options("FullyConnectedOptions"),
                    version=4,
                )
            partial_sums.append(
                self.emit("DEQUANTIZE", [summed], self.new("partial_sum_f32", out_shape), version=2)
            )
        total = partial_sums[0]
        for partial in partial_sums[1:]:
            total = self.emit("ADD", [total, partial], self.new(name, out_shape))
        return total

    # --- float linear layers ----------------------------------------------------------------
    @staticmethod
    def _layout(weights: np.ndarray, conv: bool) -> np.ndarray:
        return np.ascontiguousarray(weights.transpose(0, 2, 3, 1) if conv else weights)

    @staticmethod
    def _layout_shape(shape: Sequence[int], conv: bool) -> tuple[int, ...]:
        return (shape[0], shape[2], shape[3], shape[1]) if conv else tuple(shape)

    def _conv_options(self, attrs: dict[str, Any], padding: str) -> Any:
        strides = list(attrs.get("strides", [1, 1]))
        dilations = list(attrs.get("dilations", [1, 1]))
        return self.out.options(
            "Conv2DOptions",
            padding=getattr(self.out.fb.Padding, padding),
            strideH=int(strides[0]),
            strideW=int(strides[1]),
            dilationHFactor=int(dilations[0]),
            dilationWFactor=int(dilations[1]),
        )

    @staticmethod
    def _conv_shape(
        shape: Sequence[int], weights: Sequence[int], attrs: dict[str, Any], pads: Sequence[int]
    ) -> tuple[int, ...]:
        strides = list(attrs.get("strides", [1, 1]))
        dilations = list(attrs.get("dilations", [1, 1]))
        kh, kw = int(weights[2]), int(weights[3])
        return (
            shape[0],
            int(weights[0]),
            conv_output_size(shape[2], kh, int(strides[0]), (pads[0], pads[2]), int(dilations[0])),
            conv_output_size(shape[3], kw, int(strides[1]), (pads[1], pads[3]), int(dilations[1])),
        )

    def _linear(
        self,
        conv: bool,
        x: int,
        weights: int,
        bias: int,
        out_shape: tuple[int, ...],
        attrs: dict[str, Any],
        name: str,
        padding: str = "VALID",
        depthwise: int = 0,
    ) -> int:
        y = self.new(name, out_shape)
        if depthwise:
            options = self._conv_options(attrs, padding)
            dw = self.out.options(
                "DepthwiseConv2DOptions",
                padding=options.padding,
                strideH=options.strideH,
                strideW=options.strideW,
                dilationHFactor=options.dilationHFactor,
                dilationWFactor=options.dilationWFactor,
                depthMultiplier=depthwise,
            )
            return self.emit("DEPTHWISE_CONV_2D", [x, weights, bias], y, dw, version=2)
        if conv:
            return self.emit("CONV_2D", [x, weights, bias], y, self._conv_options(attrs, padding))
        return self.emit(
            "FULLY_CONNECTED", [x, weights, bias], y, self.out.options("FullyConnectedOptions")
        )

    def weights_tensor(
        self, name: str, layout: Callable[[np.ndarray], np.ndarray], axis_map: dict[int, int]
    ) -> int:
        """Float weights, or int8 ones with their DEQUANTIZE (folded by the interpreter)."""
        stored = self.stored_weights(name)
        if stored is None:
            raise ExportError(
                f"the tflite writer needs {name!r} to be a stored weight (initializer, or int8 "
                "behind a DequantizeLinear)"
            )
        array, quant = stored
        arranged = layout(array)
        if quant is None:
            return self.out.constant("weights", arranged.astype(np.float32))
        moved = Quant(quant.scale, quant.zero_point, axis_map.get(quant.axis, quant.axis))
        packed = self.out.constant("weights_int8", arranged, "int8", quant=moved)
        return self.emit("DEQUANTIZE", [packed], self.out.tensor("weights", arranged.shape))


# --- handlers of standard ops ------------------------------------------------------------


def _conv(t: _Translator, node: onnx.NodeProto) -> None:
    attrs = _attrs(node)
    x = t.value(node.input[0])
    stored = t.stored_weights(node.input[1])
    if stored is None:
        raise ExportError(f"the tflite writer needs Conv {node.name}'s weights as constants")
    shape = stored[0].shape
    group = int(attrs.get("group", 1))
    pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    out_shape = t._conv_shape(x.shape, shape, attrs, pads)
    padding, source = "VALID", x.index
    if any(pads):
        if _is_same(x.shape[2:], shape[2:], attrs, pads):
            padding = "SAME"
        else:
            source, _ = t.pad(x.index, x.shape, pads, t.scalar(0.0), "conv_padded")
    bias_value = t.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    bias = t.out.constant(
        "bias",
        np.zeros(shape[0], np.float32) if bias_value is None else bias_value.astype(np.float32),
    )
    name = node.output[0]
    if group == 1:
        weights = t.weights_tensor(node.input[1], lambda w: w.transpose(0, 2, 3, 1), {0: 0})
        y = t._linear(True, source, weights, bias, out_shape, attrs, name, padding)
    elif group == x.shape[1] and shape[1] == 1:
        weights = t.weights_tensor(node.input[1], lambda w: w.transpose(1, 2, 3, 0), {0: 3})
        y = t._linear(
            True,
            source,
            weights,
            bias,
            out_shape,
            attrs,
            name,
            padding,
            depthwise=shape[0] // group,
        )
    else:
        raise ExportError(
            f"the tflite writer has no translation for a grouped Conv ({name}: {group} groups)"
        )
    t.values[node.output[0]] = _Value(y, out_shape)


def _is_same(
    size: Sequence[int], kernel: Sequence[int], attrs: dict[str, Any], pads: Sequence[int]
) -> bool:
    """Whether TFLite's SAME padding pads exactly ``pads`` (ONNX order) for this geometry."""
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    for axis in (0, 1):
        stride, extent = int(strides[axis]), (int(kernel[axis]) - 1) * int(dilations[axis]) + 1
        out = -(-int(size[axis]) // stride)
        total = max((out - 1) * stride + extent - int(size[axis]), 0)
        if (pads[axis], pads[axis + 2]) != (total // 2, total - total // 2):
            return False
    return True


def _gemm(t: _Translator, node: onnx.NodeProto) -> None:
    attrs = _attrs(node)
    if (
        int(attrs.get("transA", 0))
        or float(attrs.get("alpha", 1.0)) != 1.0
        or float(attrs.get("beta", 1.0)) != 1.0
    ):
        raise ExportError(f"the tflite writer takes Gemm without transA/alpha/beta ({node.name})")
    x = t.value(node.input[0])
    transposed = bool(int(attrs.get("transB", 0)))
    weights = t.weights_tensor(
        node.input[1], (lambda w: w) if transposed else (lambda w: w.T), {0: 0, 1: 0}
    )
    rows = t.out.shape(weights)[0]
    bias_value = t.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    bias = t.out.constant(
        "bias", np.zeros(rows, np.float32) if bias_value is None else bias_value.reshape(-1)
    )
    out_shape = (x.shape[0], rows)
    y = t._linear(False, x.index, weights, bias, out_shape, attrs, node.output[0])
    t.values[node.output[0]] = _Value(y, out_shape)


def _batch_norm(t: _Translator, node: onnx.NodeProto) -> None:
    x = t.value(node.input[0])
    constants = [t.const(n) for n in node.input[1:5]]
    if any(v is None for v in constants):
        raise ExportError(f"the tflite writer needs BatchNormalization {node.name}'s constants")
    scale, bias, mean, var = (np.asarray(v, np.float32) for v in constants)
    eps = float(_attrs(node).get("epsilon", 1e-5))
    a = (scale / np.sqrt(var.astype(np.float32) + np.float32(eps))).astype(np.float32)
    b = (bias - mean * a).astype(np.float32)
    shape = (1, -1) + (1,) * (len(x.shape) - 2)
    scaled = t.emit("MUL", [x.index, t.layout_const(a.reshape(shape), x)], t.new("bn", x.shape))
    y = t.emit("ADD", [scaled, t.layout_const(b.reshape(shape), x)], t.new(node.output[0], x.shape))
    t.values[node.output[0]] = _Value(y, x.shape)


_ELEMENTWISE = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV"}


def _elementwise(t: _Translator, node: onnx.NodeProto) -> None:
    op = _ELEMENTWISE[node.op_type]
    names = list(node.input)
    consts = [t.const(n) for n in names]
    live = [t.values.get(n) for n in names]
    if all(v is None for v in live):
        raise ExportError(f"the tflite writer got {node.op_type} {node.name} of two constants")
    like = next(v for v in live if v is not None)
    inputs, shapes = [], []
    for name, value, const in zip(names, live, consts, strict=True):
        if value is None and const is not None:
            inputs.append(t.layout_const(const, like))
            shapes.append(const.shape)
        else:
            operand = value if value is not None else t.value(name)  # t.value names what is missing
            inputs.append(operand.index)
            shapes.append(operand.shape)
    shape = tuple(np.broadcast_shapes(*shapes))
    y = t.emit(op, inputs, t.new(node.output[0], shape))
    t.values[node.output[0]] = _Value(y, shape)


_UNARY = {"Relu": "RELU", "Sigmoid": "LOGISTIC", "Tanh": "TANH", "Identity": None}


def _unary(t: _Translator, node: onnx.NodeProto) -> None:
    x = t.value(node.input[0])
    op = _UNARY[node.op_type]
    if op is None:
        t.values[node.output[0]] = x
        return
    t.values[node.output[0]] = _Value(
        t.emit(op, [x.index], t.new(node.output[0], x.shape)), x.shape
    )


def _clip(t: _Translator, node: onnx.NodeProto) -> None:
    x = t.value(node.input[0])
    low = t.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    high = t.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    bounds = (None if low is None else float(low), None if high is None else float(high))
    named = {(0.0, 6.0): "RELU6", (-1.0, 1.0): "RELU_N1_TO_1", (0.0, 1.0): "RELU_0_TO_1"}
    if bounds in named:
        y = t.emit(named[bounds], [x.index], t.new(node.output[0], x.shape))
    else:
        y = x.index
        if bounds[0] is not None:
            y = t.emit("MAXIMUM", [y, t.scalar(bounds[0])], t.new("clip_low", x.shape))
        if bounds[1] is not None:
            y = t.emit("MINIMUM", [y, t.scalar(bounds[1])], t.new("clip_high", x.shape))
    t.values[node.output[0]] = _Value(y, x.shape)


def _prelu(t: _Translator, node: onnx.NodeProto) -> None:
    x = t.value(node.input[0])
    slope = t.const(node.input[1])
    if slope is None:
        raise ExportError(f"the tflite writer needs PRelu {node.name}'s slope as a constant")
    a = np.asarray(slope, np.float32)
    if x.spatial and a.ndim:
        a = a.reshape((1,) * (4 - a.ndim) + a.shape).transpose(_NHWC)[0]
    y = t.emit("PRELU", [x.index, t.out.constant("slope", a)], t.new(node.output[0], x.shape))
    t.values[node.output[0]] = _Value(y, x.shape)


def _less(t: _Translator, node: onnx.NodeProto) -> None:
    x = t.value(node.input[0])
    other = t.const(node.input[1])
    right = t.layout_const(other, x) if other is not None else t.value(node.input[1]).index
    y = t.emit("LESS", [x.index, right], t.new(node.output[0], x.shape, "bool"))
    t.values[node.output[0]] = _Value(y, x.shape)


def _where(t: _Translator, node: onnx.NodeProto) -> None:
    cond = t.value(node.input[0])
    branches = []
    for name in node.input[1:]:
        const = t.const(name)
        branches.append(t.layout_const(const, cond) if const is not None else t.value(name).index)
    y = t.emit("SELECT_V2", [cond.index, *branches], t.new(node.output[0], cond.shape))
    t.values[node.output[0]] = _Value(y, cond.shape)


def _pad(t: _Translator, node: onnx.NodeProto) -> None:
    x = t.value(node.input[0])
    table = t.const(node.input[1])
    value = t.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.float32(0)
    mode = _attrs(node).get("mode", b"constant")
    if table is None or value is None or mode not in (b"constant", "constant") or not x.spatial:
        raise ExportError(f"the tflite writer takes constant spatial Pad only ({node.name})")
    if any(table[[0, 1, 4, 5]]):
        raise ExportError(f"the tflite writer pads height and width only ({node.name})")
    pads = (int(table[2]), int(table[3]), int(table[6]), int(table[7]))
    y, shape = t.pad(x.index, x.shape, pads, t.scalar(float(value)), node.output[0])
    t.values[node.output[0]] = _Value(y, shape)


def _quantize(t: _Translator, node: onnx.NodeProto) -> None:
    x = t.value(node.input[0])
    scale = t.const(node.input[1])
    zero = t.inits.get(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
    if scale is None or scale.size != 1 or zero is None or zero.size != 1:
        raise ExportError(f"the tflite writer takes per-tensor QuantizeLinear only ({node.name})")
    dtype = {np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8"}.get(zero.dtype)
    if dtype is None:
        raise ExportError(f"the tflite writer quantizes to int8 or uint8 only ({node.name})")
    quant = Quant.per_tensor(float(scale), int(zero))
    y = t.emit("QUANTIZE", [x.index], t.new(node.output[0], x.shape, dtype, quant=quant))
    t.values[node.output[0]] = _Value(y, x.shape)


def _dequantize(t: _Translator, node: onnx.NodeProto) -> None:
    if node.input[0] in t.inits:  # weights: read where used (stored_weights / const)
        return
    x = t.value(node.input[0])
    y = t.emit("DEQUANTIZE", [x.index], t.new(node.output[0], x.shape), version=2)
    t.values[node.output[0]] = _Value(y, x.shape)


def _pool(t: _Translator, node: onnx.NodeProto) -> None:
    attrs = _attrs(node)
    x = t.value(node.input[0])
    if len(node.output) > 1 and node.output[1]:
        raise ExportError(f"the tflite writer cannot return MaxPool indices ({node.name})")
    if any(int(d) != 1 for d in attrs.get("dilations", [1, 1])):
        raise ExportError(f"the tflite writer takes undilated pooling only ({node.name})")
    kh, kw = (int(k) for k in attrs["kernel_shape"])
    sh, sw = (int(s) for s in attrs.get("strides", [1, 1]))
    top, left, bottom, right = (int(p) for p in attrs.get("pads", [0, 0, 0, 0]))
    ceil = bool(int(attrs.get("ceil_mode", 0)))
    _, c, h, w = x.shape
    more_h = pool_extra_padding(h, kh, sh, (top, bottom), ceil)
    more_w = pool_extra_padding(w, kw, sw, (left, right), ceil)
    pads = (top, left, bottom + more_h, right + more_w)
    is_max = node.op_type == "MaxPool"
    source, padded = t.pad(
        x.index, x.shape, pads, t.scalar(_LOWEST if is_max else 0.0), "pool_padded"
    )
    out_h = (padded[2] - kh) // sh + 1
    out_w = (padded[3] - kw) // sw + 1
    out_shape = (x.shape[0], c, out_h, out_w)
    options = t.out.options(
        "Pool2DOptions",
        padding=t.out.fb.Padding.VALID,
        strideH=sh,
        strideW=sw,
        filterHeight=kh,
        filterWidth=kw,
    )
    y = t.emit(
        "MAX_POOL_2D" if is_max else "AVERAGE_POOL_2D",
        [source],
        t.new(node.output[0], out_shape),
        options,
    )
    if not is_max and any(pads):
        counts = average_pool_counts(
            (h, w),
            (kh, kw),
            (sh, sw),
            (top, left, bottom, right),
            (more_h, more_w),
            bool(int(attrs.get("count_include_pad", 0))),
        )
        correction = (kh * kw / counts).astype(np.float32)
        if not np.all(correction == 1):
            y = t.emit(
                "MUL",
                [y, t.out.constant("pool_count", correction[None, :, :, None])],
                t.new("pool_counted", out_shape),
            )
    t.values[node.output[0]] = _Value(y, out_shape)


def _global_pool(t: _Translator, node: onnx.NodeProto) -> None:
    x = t.value(node.input[0])
    out_shape = (x.shape[0], x.shape[1], 1, 1)
    axes = t.out.constant("mean_axes", np.array([1, 2], np.int32))
    y = t.emit(
        "MEAN",
        [x.index, axes],
        t.new(node.output[0], out_shape),
        t.out.options("ReducerOptions", keepDims=True),
    )
    t.values[node.output[0]] = _Value(y, out_shape)


def _flatten(t: _Translator, node: onnx.NodeProto) -> None:
    x = t.value(node.input[0])
    if int(_attrs(node).get("axis", 1)) != 1:
        raise ExportError(f"the tflite writer flattens from axis 1 only ({node.name})")
    if not x.spatial:
        if len(x.shape) == 2:
            t.values[node.output[0]] = x
            return
        raise ExportError(f"the tflite writer flattens 2-D or 4-D tensors only ({node.name})")
    source = x.index
    if x.shape[2] * x.shape[3] > 1:  # NHWC order differs from NCHW's: transpose back first
        perm = t.out.constant("perm_nchw", np.array(_NCHW, np.int32))
        source = t.emit("TRANSPOSE", [source, perm], t.out.tensor("nchw", x.shape))
    features = int(np.prod(x.shape[1:]))
    target = t.out.constant("flat_shape", np.array([-1, features], np.int32))
    y = t.emit("RESHAPE", [source, target], t.out.tensor(node.output[0], (x.shape[0], features)))
    t.values[node.output[0]] = _Value(y, (x.shape[0], features))


def _concat(t: _Translator, node: onnx.NodeProto) -> None:
    parts = [t.value(n) for n in node.input]
    axis = int(_attrs(node)["axis"])
    rank = len(parts[0].shape)
    axis %= rank
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    tfl_axis = _NHWC.index(axis) if rank == 4 else axis
    y = t.emit(
        "CONCATENATION",
        [p.index for p in parts],
        t.new(node.output[0], shape),
        t.out.options("ConcatenationOptions", axis=tfl_axis),
    )
    t.values[node.output[0]] = _Value(y, tuple(shape))


def _slice(t: _Translator, node: onnx.NodeProto) -> None:
    x = t.value(node.input[0])
    starts, ends = t.const(node.input[1]), t.const(node.input[2])
    axes = t.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = t.const(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if starts is None or ends is None:
        raise ExportError(f"the tflite writer takes Slice with constant bounds ({node.name})")
    rank = len(x.shape)
    axes = np.arange(len(starts)) if axes is None else axes
    steps = np.ones(len(starts), np.int64) if steps is None else steps
    begin, end, stride = [0] * rank, list(x.shape), [1] * rank
    shape = list(x.shape)
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        a = int(a) % rank
        if int(st) < 1:
            raise ExportError(f"the tflite writer takes forward Slice steps only ({node.name})")
        size = x.shape[a]
        lo = max(0, min(size, int(s) + size if int(s) < 0 else int(s)))
        hi = max(0, min(size, int(e) + size if int(e) < 0 else int(e)))
        begin[a], end[a], stride[a] = lo, hi, int(st)
        shape[a] = max(0, -(-(hi - lo) // int(st)))
    order = _NHWC if rank == 4 else tuple(range(rank))
    arrays = [np.array([v[i] for i in order], np.int32) for v in (begin, end, stride)]
    y = t.emit(
        "STRIDED_SLICE",
        [
            x.index,
            *(
                t.out.constant(n, a)
                for n, a in zip(("begin", "end", "strides"), arrays, strict=True)
            ),
        ],
        t.new(node.output[0], shape),
        t.out.options("StridedSliceOptions", beginMask=1, endMask=1),  # every batch row
    )
    t.values[node.output[0]] = _Value(y, tuple(shape))


_HANDLERS: dict[str, Callable[[_Translator, onnx.NodeProto], None]] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "BatchNormalization": _batch_norm,
    **{op: _elementwise for op in _ELEMENTWISE},
    **{op: _unary for op in _UNARY},
    "Clip": _clip,
    "PRelu": _prelu,
    "Less": _less,
    "Where": _where,
    "Pad": _pad,
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _global_pool,
    "Flatten": _flatten,
    "Concat": _concat,
    "Slice": _slice,
}

TFLITE_OPS = frozenset(_HANDLERS)
"""The ONNX ops the writer translates (of the ``onnx-trt`` graph it reads)."""


def to_tflite(proto: onnx.ModelProto, binary_form: str = "auto") -> tuple[bytes, dict[str, Any]]:
    """The ``.tflite`` bytes of an ``onnx-trt`` graph and what was chosen per binary layer.

    ``binary_form`` is ``auto`` (per layer, :func:`exporters.tflite_binary.choose_form`),
    ``float`` or ``int8``. The info dict has ``binary_form`` and ``layers`` (name, form, groups).
    """
    if binary_form not in BINARY_FORMS:
        raise ExportError(
            f"unknown binary form {binary_form!r}; use one of {', '.join(BINARY_FORMS)}"
        )
    translator = _Translator(proto, binary_form)
    data = translator.run()
    forms = [layer["form"] for layer in translator.layers]
    info = {
        "binary_form": binary_form,
        "binary_layers": {form: forms.count(form) for form in sorted(set(forms))},
        "layers": translator.layers,
    }
    return data, info
