"""What TensorRT's ONNX parser accepts, checked on a model before it is written as ``onnx-trt``.

TensorRT cannot be installed without NVIDIA's own package index and needs a GPU even to parse
a model, so an ``onnx-trt`` artifact is checked here, statically, against the parser's support
matrix (onnx-tensorrt's ``docs/operators.md``, the TensorRT 8.4 table, the oldest of the
JetPack 5/6 releases: every later parser accepts at least these) and the restrictions that
matter for bitfleet's graphs: quantization zero points of 0, convolution weights that are
initializers (or a DequantizeLinear of one), Pad amounts and Slice/Squeeze/Unsqueeze axes
that are initializers, and an opset the parser reads. An unknown op would go to TensorRT's
plugin lookup by name and fail at build time on the device; here it fails at export.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["TENSORRT_ONNX_OPS", "TENSORRT_MAX_OPSET", "tensorrt_problems"]

TENSORRT_MAX_OPSET = 17
"""The newest default-domain opset of TensorRT 8.5/8.6 (JetPack 5.1 and 6.0)."""

TENSORRT_ONNX_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
    Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GRU HardSigmoid Identity If ImageScaler InstanceNormalization IsNaN
    LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
    MaxPool Mean Min Mul Neg Not Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomUniform RandomUniformLike Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
    ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
    ReverseSequence RNN Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape
    Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze
    Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Unsqueeze Upsample Where Xor
    """.split()
)
"""Default-domain ops TensorRT's ONNX parser supports (onnx-tensorrt, TensorRT 8.4 matrix)."""

# inputs that TensorRT wants as initializers: op -> input positions
_INITIALIZER_INPUTS = {"Pad": (1,), "Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,)}


def tensorrt_problems(model: Any) -> list[str]:
    """Why TensorRT's parser would refuse ``model`` (an ``onnx.ModelProto``); empty if none."""
    from onnx import numpy_helper

    graph = model.graph
    problems: list[str] = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > TENSORRT_MAX_OPSET:
            problems.append(f"opset {opset.version} (TensorRT reads up to {TENSORRT_MAX_OPSET})")
        elif opset.domain not in ("", "ai.onnx"):
            problems.append(f"custom domain {opset.domain!r}")
    initializers = {init.name: init for init in graph.initializer}
    produced_by = {out: node for node in graph.node for out in node.output}
    unknown = sorted(
        {
            f"{node.domain + '.' if node.domain else ''}{node.op_type}"
            for node in graph.node
            if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_ONNX_OPS
        }
    )
    if unknown:
        problems.append(f"ops TensorRT's parser lacks: {', '.join(unknown)}")
    for node in graph.node:
        label = node.name or node.output[0]
        for position in _INITIALIZER_INPUTS.get(node.op_type, ()):
            if len(node.input) > position and node.input[position]:
                if node.input[position] not in initializers:
                    problems.append(
                        f"{node.op_type} {label}: input {position} is not an initializer"
                    )
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = initializers.get(node.input[2])
            if zero is None or np.any(numpy_helper.to_array(zero) != 0):
                problems.append(f"{node.op_type} {label}: zero point is not an initializer of 0")
        if node.op_type in ("Conv", "ConvTranspose"):
            weight = node.input[1]
            source = produced_by.get(weight)
            from_dq = (
                source is not None
                and source.op_type == "DequantizeLinear"
                and source.input[0] in initializers
            )
            if weight not in initializers and not from_dq:
                problems.append(f"{node.op_type} {label}: weights are not an initializer")
    return problems
