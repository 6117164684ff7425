"""Float parts in int8: the float convolutions and dense layers of an exported graph.

A binary network keeps some layers in float by design: Bi-Real-18's stem, its 1x1
downsampling shortcuts and its classifier. At 1000 classes they are two thirds of the fast
artifact (2.8 of 4.2 MB), more than the packed binary weights. ``float_parts="int8"`` stores
each of their weights as int8 with one scale per output channel (symmetric: ``w ~ scale *
q``, ``scale = max|w| / 127``), dequantized in the graph by a standard DequantizeLinear in
front of the Conv or Gemm, so every runtime (ONNX Runtime, TensorRT, bitfleet's own) reads
it. Per-channel weight scales need no calibration data: they come from the weights.
Activations stay float, so the cost is the weights' rounding error alone.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["FLOAT_PARTS", "quantize_float_weights", "per_channel_int8"]

FLOAT_PARTS = ("fp32", "int8")

MIN_WEIGHTS = 64
"""Smaller float weights stay float (a scale per channel would cost as much as it saves)."""


def per_channel_int8(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 and the float32 scale of every slice along ``axis`` (zero slices: 1)."""
    moved = np.moveaxis(weights.astype(np.float32), axis, 0)
    peak = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    shape = (-1,) + (1,) * (moved.ndim - 1)
    q = np.clip(np.rint(moved / scale.reshape(shape)), -127, 127).astype(np.int8)
    return np.moveaxis(q, 0, axis), scale


def quantize_float_weights(proto: onnx.ModelProto) -> int:
    """Rewrite every float Conv/Gemm weight initializer as int8 + DequantizeLinear, in place.

    Returns how many weights were rewritten. Weights that already come through a
    DequantizeLinear (binary layers of ``onnx-trt``, int8/int4 layers) are left alone.
    """
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    dequantizer_of: dict[str, onnx.NodeProto] = {}  # consumer's weight name -> its DQ node
    done: set[str] = set()
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        name = node.input[1]
        init = inits.get(name)
        if name in done or init is None or init.data_type != onnx.TensorProto.FLOAT:
            continue
        weights = numpy_helper.to_array(init)
        if weights.size < MIN_WEIGHTS or readers.get(name, 0) != 1:
            continue
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 1 if node.op_type == "Gemm" and not trans_b else 0  # the output channel axis
        q, scale = per_channel_int8(weights, axis)
        graph.initializer.remove(init)
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{name}_int8"),
                numpy_helper.from_array(scale, f"{name}_scale"),
                numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero"),
            ]
        )
        dequantizer_of[name] = helper.make_node(
            "DequantizeLinear",
            [f"{name}_int8", f"{name}_scale", f"{name}_zero"],
            [name],
            name=f"{name}_dequantize",
            axis=axis,
        )
        done.add(name)
    # each DequantizeLinear right before its reader: the fast runtime cuts the graph into
    # segments, and the weight must be dequantized in the segment that reads it
    nodes = []
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 1:
            dq = dequantizer_of.get(node.input[1])
            if dq is not None:
                nodes.append(dq)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return len(done)
