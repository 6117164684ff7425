"""Float parts in int8: per-channel weights, a DequantizeLinear in front of each reader."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

import models
from exporters.float_parts import per_channel_int8, quantize_float_weights
from exporters.onnx_writer import to_onnx
from exporters.tensorrt_ops import tensorrt_problems


def test_per_channel_int8_rounds_within_half_a_step():
    rng = np.random.default_rng(0)
    weights = (
        rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * np.arange(1, 7)[:, None, None, None]
    )
    weights[2] = 0.0  # a dead channel keeps scale 1 and quantizes to 0
    q, scale = per_channel_int8(weights, axis=0)
    assert q.dtype == np.int8 and scale.shape == (6,) and scale[2] == 1.0
    restored = q.astype(np.float32) * scale[:, None, None, None]
    assert np.all(np.abs(restored - weights) <= scale[:, None, None, None] / 2 + 1e-7)
    assert np.abs(q).max() == 127
    # a (Cin, Cout) Gemm weight without transB has its output channels on axis 1
    dense = weights.reshape(6, -1)
    q0, scale0 = per_channel_int8(dense, axis=0)
    q1, scale1 = per_channel_int8(dense.T, axis=1)
    assert np.array_equal(scale0, scale1) and np.array_equal(q1.T, q0)


@pytest.mark.parametrize("flavour", ["onnx", "onnx-portable", "onnx-trt"])
def test_every_float_conv_and_gemm_reads_int8(flavour):
    model = models.create("bireal18", stem="imagenet", width=0.25, num_classes=1000).eval()
    proto = to_onnx(model, (3, 64, 64), flavour)
    before = len(proto.SerializeToString())
    rewritten = quantize_float_weights(proto)
    assert rewritten == 5  # the stem, three 1x1 shortcuts, the classifier
    dequantized = 0
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    produced = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            weight = node.input[1]
            assert (
                weight not in inits or inits[weight].dtype != np.float32 or inits[weight].size < 64
            )
            source = produced.get(weight)
            if source is not None and source.op_type == "DequantizeLinear":
                assert inits[source.input[0]].dtype == np.int8
                assert not inits[source.input[2]].any()  # zero points 0 (TensorRT's rule)
                dequantized += 1
    assert dequantized >= 5
    if flavour == "onnx-trt":
        assert tensorrt_problems(proto) == []
    # at 1000 classes the classifier dominates the float parts: with packed binary weights the
    # whole model halves; onnx-trt keeps its binary weights in int8, so it shrinks less
    assert len(proto.SerializeToString()) < (0.8 if flavour == "onnx-trt" else 0.6) * before
