"""The numpy float ops against ONNX Runtime, node by node and on whole exported models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import exporters
import models
from exporters import numpy_ops, onnx_proto, runtime

RNG = np.random.default_rng(0)


def _check(op: str, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray], **attrs):
    """Run one node in ORT and in numpy_ops; they must agree to float rounding."""
    names = list(inputs) + list(consts)
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    parsed = onnx_proto.read_model(data).nodes[0]
    assert numpy_ops.supported(parsed)
    got = numpy_ops.run(parsed, [*inputs.values(), *consts.values()])
    assert got.dtype == np.float32 and got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize(
    "attrs,cin,cout",
    [
        ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, 3, 8),
        ({"kernel_shape": [7, 7], "pads": [3, 3, 3, 3], "strides": [2, 2]}, 3, 5),
        ({"kernel_shape": [3, 3], "pads": [0, 1, 2, 0], "dilations": [2, 1]}, 4, 6),
        ({"kernel_shape": [1, 1], "strides": [2, 1]}, 6, 4),
        ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": 2}, 4, 6),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv(attrs, cin, cout, bias):
    kh, kw = attrs["kernel_shape"]
    group = attrs.get("group", 1)
    consts = {"w": _x(cout, cin // group, kh, kw)}
    if bias:
        consts["b"] = _x(cout)
    _check("Conv", {"x": _x(2, cin, 11, 9)}, consts, **attrs)


@pytest.mark.parametrize(
    "op,attrs",
    [
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
        ("MaxPool", {"kernel_shape": [2, 2], "dilations": [2, 2]}),
        ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
        ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
        ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        (
            "AveragePool",
            {
                "kernel_shape": [3, 3],
                "strides": [2, 2],
                "pads": [1, 0, 1, 2],
                "count_include_pad": 1,
            },
        ),
        (
            "AveragePool",
            {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 1, 0, 0], "ceil_mode": 1},
        ),
    ],
)
def test_pooling(op, attrs):
    _check(op, {"x": _x(2, 3, 9, 7)}, {}, **attrs)


def test_batch_norm_gemm_flatten_and_the_rest():
    x = _x(2, 4, 5, 5)
    stats = {"s": _x(4), "b": _x(4), "m": _x(4), "v": np.abs(_x(4)) + 0.5}
    _check("BatchNormalization", {"x": x}, stats, epsilon=1e-3)
    _check("Relu", {"x": x}, {})
    _check("GlobalAveragePool", {"x": x}, {})
    _check("Flatten", {"x": x}, {}, axis=2)
    _check("Concat", {"a": x, "c": _x(2, 3, 5, 5)}, {}, axis=1)
    for op in ("Add", "Sub", "Mul", "Div"):
        _check(op, {"a": x}, {"c": np.abs(_x(1, 4, 1, 1)) + 0.5})
    _check("Gemm", {"a": _x(3, 6)}, {"w": _x(5, 6), "c": _x(5)}, transB=1)
    _check("Gemm", {"a": _x(6, 3)}, {"w": _x(6, 5), "c": _x(5)}, transA=1, alpha=0.5, beta=2.0)


def test_unsupported_attributes_go_to_onnxruntime():
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", 1, None)],
        [helper.make_empty_tensor_value_info("y")],
    )
    parsed = onnx_proto.read_model(helper.make_model(graph).SerializeToString()).nodes[0]
    assert not numpy_ops.supported(parsed)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    small = models.create("bireal18", width=0.125, stem="imagenet", num_classes=10).eval()
    lenet = models.create("lenet5").eval()
    return {
        "bireal": exporters.export(
            small, root / "b", "onnx", name="b", version="1", input_shape=(3, 32, 32)
        ),
        "lenet": exporters.export(
            lenet, root / "l", "onnx", name="l", version="1", input_shape=(1, 32, 32)
        ),
    }


@pytest.mark.parametrize("name", ["bireal", "lenet"])
def test_whole_models_agree_with_the_onnxruntime_path(artifacts, name):
    fast = runtime.load(artifacts[name], threads=1)
    assert fast.float_ops == "numpy"  # small float work: auto keeps it in numpy
    assert all(kind != "ort" for kind, _ in fast.steps)
    reference = runtime.load(artifacts[name], threads=1, float_ops="onnxruntime")
    x = RNG.standard_normal((3, *fast.input_shape)).astype(np.float32)
    want = reference.predict(x)
    got = fast.predict(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).all()


def test_auto_sends_large_float_work_to_onnxruntime(tmp_path):
    net = models.create("bireal18", stem="imagenet", width=0.25).eval()
    artifact = exporters.export(
        net, tmp_path / "a", "onnx", name="x", version="1", input_shape=(3, 160, 160)
    )
    assert runtime.load(artifact, threads=1).float_ops == "onnxruntime"
    forced = runtime.load(artifact, threads=1, float_ops="numpy")
    assert forced.float_ops == "numpy"


def test_float_ops_errors(artifacts, tmp_path):
    with pytest.raises(ValueError, match="float_ops must be one of auto, numpy, onnxruntime"):
        runtime.load(artifacts["lenet"], float_ops="tf")
    net = models.create("nasb_a").eval()
    artifact = exporters.export(
        net, tmp_path / "n", "onnx", name="n", version="1", input_shape=(3, 32, 32)
    )
    assert runtime.load(artifact, threads=1).float_ops == "onnxruntime"
    with pytest.raises(runtime.RuntimeLoadError, match=r"numpy path does not evaluate \(.*Reshape"):
        runtime.load(artifact, float_ops="numpy")


@pytest.mark.parametrize("name", ["bireal", "lenet"])
def test_a_small_model_never_loads_onnxruntime(artifacts, name):
    code = (
        "import sys, numpy as np\n"
        "from exporters import runtime\n"
        f"p = runtime.load({str(artifacts[name])!r}, threads=1)\n"
        "p.predict(np.zeros((1, *p.input_shape), np.float32))\n"
        "loaded = [m for m in ('onnxruntime', 'onnx', 'numba', 'torch') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
