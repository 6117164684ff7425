"""exporters.onnx_proto against the onnx package: the same graph, and sub-models ORT runs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import exporters
import models
from exporters import onnx_proto


@pytest.fixture(scope="module")
def bireal_model(tmp_path_factory) -> bytes:
    net = models.create("bireal18", width=0.125, stem="imagenet", num_classes=10).eval()
    root = tmp_path_factory.mktemp("fast")
    artifact = exporters.export(
        net, root / "a", "onnx", name="x", version="1", input_shape=(3, 32, 32)
    )
    return (artifact / "model.onnx").read_bytes()


def test_reads_what_onnx_reads(bireal_model):
    ours = onnx_proto.read_model(bireal_model)
    theirs = onnx.load_from_string(bireal_model)
    assert ours.ir_version == theirs.ir_version
    assert ours.opsets == tuple((o.domain, o.version) for o in theirs.opset_import)
    assert ours.inputs == tuple(
        i.name for i in theirs.graph.input if i.name not in ours.initializers
    )
    assert ours.outputs == tuple(o.name for o in theirs.graph.output)
    assert len(ours.nodes) == len(theirs.graph.node)
    for mine, node in zip(ours.nodes, theirs.graph.node, strict=True):
        assert (mine.op_type, mine.domain, mine.name) == (node.op_type, node.domain, node.name)
        assert mine.inputs == tuple(node.input) and mine.outputs == tuple(node.output)
        want = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for key, value in want.items():
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, list | tuple):
                value = list(value)
            if isinstance(value, float):
                assert mine.attributes[key] == pytest.approx(value)
            else:
                assert mine.attributes[key] == value, key
    assert set(ours.initializers) == {t.name for t in theirs.graph.initializer}
    for tensor in theirs.graph.initializer:
        got = ours.initializers[tensor.name].array()
        want = numpy_helper.to_array(tensor)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5,
        np.array([-3, 0, 7, -(2**40)], dtype=np.int64),
        np.array([[1, 255]], dtype=np.uint8),
        np.array([True, False]),
        np.array(3.5, dtype=np.float64),
        np.array([-1.5, 2.0], dtype=np.float16),
    ],
    ids=lambda a: str(a.dtype),
)
@pytest.mark.parametrize("raw", [True, False], ids=["raw_data", "typed_fields"])
def test_tensors_in_both_encodings(array, raw):
    tensor = numpy_helper.from_array(array, "t")
    if not raw:  # the typed repeated fields that older exporters write
        kind = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor = helper.make_tensor("t", kind, array.shape, array.reshape(-1).tolist())
        assert not tensor.raw_data
    got = onnx_proto.Initializer("t", tensor.SerializeToString()).array()
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)


def test_attributes_of_every_kind():
    node = helper.make_node(
        "Foo",
        ["a"],
        ["b"],
        f=0.25,
        i=-7,
        s="text",
        ints=[1, -2, 3],
        floats=[0.5, -1.0],
        strings=["x", "y"],
        one=[4],
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", 1, None)],
        [helper.make_empty_tensor_value_info("b")],
    )
    model = onnx_proto.read_model(helper.make_model(graph).SerializeToString())
    assert model.nodes[0].attributes == {
        "f": 0.25,
        "i": -7,
        "s": "text",
        "ints": [1, -2, 3],
        "floats": [0.5, -1.0],
        "strings": ["x", "y"],
        "one": [4],
    }


def test_a_segment_runs_in_onnxruntime():
    weight = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("ArgMax", ["r"], ["k"], axis=1, keepdims=0),
        helper.make_node("Neg", ["r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    model = onnx_proto.read_model(data)
    sub = onnx_proto.segment_model(model, list(model.nodes[:3]), [("x", 1)], ["r", "k"], "seg")
    parsed = onnx.load_from_string(sub)  # well-formed protobuf, as onnx reads it
    assert [n.op_type for n in parsed.graph.node] == ["MatMul", "Relu", "ArgMax"]
    assert [i.name for i in parsed.graph.initializer] == ["w"]
    assert [o.name for o in parsed.graph.output] == ["r", "k"]
    session = ort.InferenceSession(sub, providers=["CPUExecutionProvider"])
    assert [o.type for o in session.get_outputs()] == ["tensor(float)", "tensor(int64)"]
    x = np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)
    r, k = session.run(None, {"x": x})
    np.testing.assert_allclose(r, np.maximum(x @ weight, 0), rtol=1e-6)
    assert k.tolist() == [int(np.argmax(x @ weight))]


@pytest.mark.parametrize("cut", [1, 7, 100, -3])
def test_truncated_or_garbage_bytes_are_one_clear_error(bireal_model, cut):
    with pytest.raises(onnx_proto.ProtoError):
        onnx_proto.read_model(bireal_model[:cut])
    with pytest.raises(onnx_proto.ProtoError):
        onnx_proto.read_model(b"\xff" * 64)


def test_external_data_is_refused():
    tensor = numpy_helper.from_array(np.zeros(3, np.float32), "t")
    tensor.data_location = TensorProto.EXTERNAL
    with pytest.raises(onnx_proto.ProtoError, match="external file"):
        onnx_proto.Initializer("t", tensor.SerializeToString()).array()


def test_fast_runtime_loads_without_onnx_or_numba(tmp_path):
    net = models.create("bireal18", width=0.125, stem="imagenet", num_classes=10).eval()
    artifact = exporters.export(
        net, tmp_path / "a", "onnx", name="x", version="1", input_shape=(3, 32, 32)
    )
    code = (
        "import sys, numpy as np\n"
        "from exporters import runtime\n"
        f"p = runtime.load({str(artifact)!r})\n"
        "p.predict(np.zeros((1, 3, 32, 32), np.float32))\n"
        "bad = [m for m in ('onnx', 'numba', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
