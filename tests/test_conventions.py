"""The export path's shared conventions: defined once, and right against PyTorch and ONNX."""

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from exporters import artifact, conventions, onnx_fusion, onnx_writer, runtime, writer
from exporters.conventions import (
    bit_value,
    conv_output_size,
    from_onnx_pads,
    onnx_pads,
    padding4,
    sign,
    sign_bit,
)
from exporters.packing import pack_bits, unpack_bits
from models.layers import BinaryConv2d


def test_every_module_uses_the_one_definition():
    assert onnx_writer.FORMATS is conventions.FORMATS
    assert writer.FORMATS is conventions.FORMATS
    assert artifact.KNOWN_FORMATS is conventions.FORMATS
    assert onnx_writer.CUSTOM_DOMAIN is conventions.CUSTOM_DOMAIN
    assert runtime.CUSTOM_OPS is conventions.CUSTOM_OPS
    assert onnx_fusion.CUSTOM_OPS is conventions.CUSTOM_OPS
    assert conventions.CUSTOM_OPS == ("BinaryConv2d", "BinaryDense")
    assert conventions.FORMATS == ("onnx", "onnx-portable", "onnx-trt", "tensorrt", "tflite")
    assert conventions.ONNX_FORMATS == conventions.FORMATS[:3]


def test_sign_convention_on_numpy_and_torch():
    values = [-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0, float("nan")]
    want = [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert sign(np.array(values, np.float32)).tolist() == want
    assert sign(torch.tensor(values)).tolist() == want
    assert [sign(v) for v in values] == want
    assert sign_bit(np.array(values)).tolist() == [v == -1.0 for v in want]
    assert bit_value(np.array([0, 1])).tolist() == [1.0, -1.0]
    # the packed format is that convention, bit for bit
    packed = pack_bits(np.array(values, np.float32))
    assert unpack_bits(packed, len(values)).tolist() == want


def test_padding4_forms():
    assert padding4(2) == (2, 2, 2, 2)
    assert padding4(np.int64(1)) == (1, 1, 1, 1)
    assert padding4((1, 2)) == (2, 2, 1, 1)  # (h, w) -> (left, right, top, bottom)
    assert padding4([0, 1, 2, 3]) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="an int, a pair or 4 values"):
        padding4((1, 2, 3))
    with pytest.raises(ValueError, match=">= 0"):
        padding4(-1)


@pytest.mark.parametrize("padding", [1, (1, 2), "same", (0, 3)])
def test_layers_one_padding_is_the_same_order(padding):
    layer = BinaryConv2d(2, 2, (2, 3), padding=padding, input_quantizer="ste_sign")
    if padding == "same":  # asymmetric: more after than before, as PyTorch's 'same'
        assert layer.one_padding == (1, 1, 0, 1)
    else:
        assert layer.one_padding == padding4(padding)


def test_onnx_pads_round_trip():
    assert onnx_pads((1, 2, 3, 4)) == (3, 1, 4, 2)
    assert from_onnx_pads(onnx_pads((1, 2, 3, 4))) == (1, 2, 3, 4)


@pytest.mark.parametrize(
    "padding, kernel, stride, dilation",
    [((1, 2, 0, 3), (3, 2), (1, 2), (1, 1)), ((0, 1, 2, 0), (3, 3), (2, 1), (2, 1))],
)
def test_pads_and_output_size_agree_with_torch_and_onnx(padding, kernel, stride, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 9, 8)).astype(np.float32)
    w = rng.standard_normal((3, 2, *kernel)).astype(np.float32)
    want = F.conv2d(
        F.pad(torch.from_numpy(x), padding), torch.from_numpy(w), None, stride, 0, dilation
    ).numpy()
    left, right, top, bottom = padding
    assert want.shape[2:] == (
        conv_output_size(9, kernel[0], stride[0], (top, bottom), dilation[0]),
        conv_output_size(8, kernel[1], stride[1], (left, right), dilation[1]),
    )
    node = helper.make_node(
        "Conv",
        ["x", "w"],
        ["y"],
        kernel_shape=list(kernel),
        strides=list(stride),
        dilations=list(dilation),
        pads=list(onnx_pads(padding)),
    )
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conventions_import_neither_torch_nor_numpy():
    code = (
        "import sys, exporters.conventions; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
