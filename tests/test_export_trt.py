"""The onnx-trt flavour: only what TensorRT's ONNX parser reads, exact in stock ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_support import BINARY_MODELS, export_input_shape
from onnx import helper, numpy_helper

import exporters
import models
from exporters import runtime
from exporters.artifact import read_manifest
from exporters.onnx_writer import to_onnx
from exporters.tensorrt_ops import TENSORRT_MAX_OPSET, TENSORRT_ONNX_OPS, tensorrt_problems
from toolkit.bench import float_twin


@pytest.mark.parametrize("name", BINARY_MODELS)
def test_every_binary_model_is_on_the_parser_list(name):
    model = models.create(name).eval()
    proto = to_onnx(model, export_input_shape(name), "onnx-trt")
    assert tensorrt_problems(proto) == []
    assert {n.op_type for n in proto.graph.node} <= TENSORRT_ONNX_OPS
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    produced = {o: n for n in proto.graph.node for o in n.output}
    binary_convs = 0
    for node in proto.graph.node:
        source = produced.get(node.input[1]) if node.op_type in ("Conv", "Gemm") else None
        if source is not None and source.op_type == "DequantizeLinear":
            weights = inits[source.input[0]]
            assert weights.dtype == np.int8 and set(np.unique(weights)) <= {-1, 1}
            assert inits[source.input[1]] == 1.0
            binary_convs += 1
    assert binary_convs > 0  # binary layers are int8 +-1 convolutions, not float ones


def test_binary_activations_are_quantized_at_scale_one():
    proto = to_onnx(models.create("bireal18", width=0.125).eval(), (3, 32, 32), "onnx-trt")
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    quantizers = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == 16  # one per binary convolution
    for node in quantizers:
        assert inits[node.input[1]] == 1.0 and inits[node.input[2]] == 0
        assert inits[node.input[2]].dtype == np.int8


def test_the_checker_names_what_the_parser_would_refuse():
    model = models.create("bireal18", width=0.125).eval()
    portable = to_onnx(model, (3, 32, 32), "onnx-portable")
    problems = "; ".join(tensorrt_problems(portable))
    assert "BitShift" in problems and "BitwiseAnd" in problems
    assert f"opset 18 (TensorRT reads up to {TENSORRT_MAX_OPSET})" in problems
    fast = to_onnx(model, (3, 32, 32), "onnx")
    assert "bitfleet.BinaryConv2d" in "; ".join(tensorrt_problems(fast))
    # a zero point other than 0, and weights that are computed instead of stored
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
        helper.make_node("Relu", ["d"], ["w"]),
        helper.make_node("Conv", ["d", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", 1, None)],
        [helper.make_tensor_value_info("y", 1, None)],
        initializer=[
            numpy_helper.from_array(np.array(1.0, np.float32), "s"),
            numpy_helper.from_array(np.array(3, np.int8), "z"),
        ],
    )
    problems = tensorrt_problems(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    assert any("zero point is not an initializer of 0" in p for p in problems)
    assert any("Conv y: weights are not an initializer" in p for p in problems)


def test_artifact_runs_in_stock_onnxruntime_and_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model = models.create("bireal18", width=0.25, num_classes=10).eval()
    artifact = exporters.export(model, tmp_path / "trt", "onnx-trt", input_shape=(3, 32, 32))
    manifest = read_manifest(artifact)
    assert manifest["format"] == "onnx-trt" and manifest["opset"] == 17
    assert manifest["custom_ops"] == []
    predictor = runtime.load(artifact)
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = predictor.predict(x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # int8 weights: about a quarter of the same network in float
    fp32 = exporters.export(
        float_twin(model), tmp_path / "f", "onnx-portable", input_shape=(3, 32, 32)
    )
    assert (artifact / "model.onnx").stat().st_size < (fp32 / "model.onnx").stat().st_size / 3
