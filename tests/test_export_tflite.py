"""The tflite format: the flatbuffer bitfleet writes, its exact binary forms, and its runtime."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_support import BINARY_MODELS, export_input_shape
from torch import nn

import exporters
import models
from exporters import runtime
from exporters.onnx_writer import ExportError, to_onnx
from exporters.runtime import RuntimeLoadError
from exporters.tflite_binary import channel_groups, choose_form
from exporters.tflite_builder import TFLiteUnavailable
from exporters.tflite_writer import to_tflite
from models.layers import BinaryConv2d, BinaryLinear


def _interpreter(data: bytes, batch: int, shape: tuple[int, ...]):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data, num_threads=1)
    interpreter.resize_tensor_input(0, [batch, *shape])
    interpreter.allocate_tensors()
    return interpreter


def _run(data: bytes, x: np.ndarray) -> np.ndarray:
    interpreter = _interpreter(data, x.shape[0], x.shape[1:])
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _randomise_batch_norms(model: nn.Module) -> None:
    """Statistics away from (0, 1), so a mistranslated batch norm shows."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)


# int4 is the int8 form with another storage: two models with convs, dense layers and cells
CASES = [(name, form) for name in BINARY_MODELS for form in ("int8", "float")] + [
    ("bireal18", "int4"),
    ("nasb", "int4"),
]


@pytest.mark.parametrize(("name", "form"), CASES)
def test_every_registered_binary_model_matches_pytorch(name, form):
    torch.manual_seed(0)
    args = {"width": 0.25} if name.startswith("bireal") else {}
    model = models.create(name, **args).eval()
    _randomise_batch_norms(model)
    shape = export_input_shape(name)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        want = model(x).numpy()
    data, info = to_tflite(to_onnx(model, shape, "onnx-trt"), form)
    assert info["binary_layers"] and set(info["binary_layers"]) == {form}
    got = _run(data, x.numpy())
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


class _OddWidths(nn.Module):
    """Binary layers whose channel counts leave odd groups: 31 (28 + 3 at scale 1), 43
    (28 + 14 + 1: an odd remainder too large for scale 1), strided and dilated, and a binary
    dense layer of 300 inputs (254 + 46)."""

    def __init__(self) -> None:
        super().__init__()
        binary = {"input_quantizer": "ste_sign", "kernel_quantizer": "ste_sign", "bias": False}
        self.a = BinaryConv2d(31, 43, 3, padding=1, **binary)
        self.b = BinaryConv2d(43, 20, 3, stride=2, padding=1, **binary)
        self.c = BinaryConv2d(20, 12, 3, padding=2, dilation=2, **binary)
        self.d = BinaryLinear(12 * 25, 10, **binary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.c(self.b(self.a(x))).flatten(1))


@pytest.mark.parametrize("form", ["int8", "int4", "float"])
def test_odd_channel_counts_strides_and_dense_layers_are_exact(form):
    torch.manual_seed(1)
    model = _OddWidths().eval()
    x = torch.randn(2, 31, 10, 10)
    with torch.no_grad():
        want = model(x).numpy()
    data, info = to_tflite(to_onnx(model, (31, 10, 10), "onnx-trt"), form)
    assert info["binary_layers"] == {form: 4}
    if form != "float":
        assert [layer["groups"] for layer in info["layers"]] == [2, 3, 1, 2]
    got = _run(data, x.numpy())
    # +-1 sums times +-1 weights are integers: the binary path is exact, only the dense
    # layer's float multiplier rounds
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2048), st.sampled_from([1, 2, 4, 9, 25, 49, 121, 144]))
def test_channel_groups_hold_their_sums_exactly_in_int8(channels, taps):
    groups = channel_groups(channels, taps)
    assert sum(count for count, _ in groups) == channels
    for count, scale in groups:
        k = count * taps
        if scale == 2.0:  # sums of k signs share k's parity: even k halves exactly
            assert k % 2 == 0 and k <= 254
        else:
            assert scale == 1.0 and k <= 127
    assert choose_form("auto", channels, taps) == "int8"


def test_kernels_too_large_for_an_exact_group_fall_back_to_float():
    with pytest.raises(ValueError, match="use the float form"):
        channel_groups(8, 169)  # 13x13: 169 taps, odd, above 127
    assert choose_form("auto", 8, 169) == "float"
    assert choose_form("int8", 8, 9) == "int8" and choose_form("float", 8, 9) == "float"
    assert choose_form("int4", 8, 169) == "float"
    with pytest.raises(ValueError, match="unknown binary form 'int2'"):
        choose_form("int2", 8, 9)


def test_flatbuffer_round_trip_through_the_schema_module():
    from ai_edge_litert import schema_py_generated as schema

    torch.manual_seed(0)
    model = models.create("bireal18", width=0.125).eval()
    proto = to_onnx(model, (3, 32, 32), "onnx-trt")
    data, info = to_tflite(proto, "auto")
    assert data[4:8] == b"TFL3"
    read = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    assert read.version == 3 and len(read.subgraphs) == 1
    graph = read.subgraphs[0]
    names = {i: t.name.decode() for i, t in enumerate(graph.tensors)}
    assert [names[i] for i in graph.inputs] == ["input"]
    assert [names[i] for i in graph.outputs] == ["logits"]
    assert list(graph.tensors[graph.inputs[0]].shapeSignature) == [-1, 3, 32, 32]
    opnames = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    used = [opnames[read.operatorCodes[op.opcodeIndex].builtinCode] for op in graph.operators]
    convs = used.count("CONV_2D")
    # 16 binary 3x3 convs of 8..64 channels (1..3 groups of <= 28), the stem, 3 shortcuts
    groups = sum(layer["groups"] for layer in info["layers"])
    assert convs == groups + 4 and used.count("QUANTIZE") <= 16
    # the binary weights are stored as int8 +-1, every one of them
    int8 = schema.TensorType.INT8
    stored = [
        np.frombuffer(bytes(read.buffers[t.buffer].data), np.int8)
        for t in graph.tensors
        if t.type == int8 and t.buffer and t.name.decode().startswith("binary_weights")
    ]
    packed_bits = sum(
        int(np.prod(m.weight.shape)) for m in model.modules() if isinstance(m, BinaryConv2d)
    )
    assert sum(w.size for w in stored) == packed_bits
    assert all(set(np.unique(w)) <= {-1, 1} for w in stored)


def test_artifact_runs_through_runtime_load_at_any_batch(tmp_path):
    torch.manual_seed(0)
    model = models.create("bireal18", width=0.125).eval()
    path = exporters.export(model, tmp_path / "a", "tflite", input_shape=(3, 32, 32))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "tflite" and set(manifest["files"]) == {"model.tflite"}
    assert manifest["opset"] is None and manifest["tflite"]["binary_form"] == "auto"
    predictor = runtime.load(path, threads=1)
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    for batch in (x, x[:1], x[0], x):  # resizes the interpreter, and back
        got = predictor.predict(batch)
        assert np.abs(got - want[: len(got)]).max() <= 1e-4 * np.abs(want).max()


def test_int8_float_parts_shrink_the_file_and_compute_what_onnx_trt_does(tmp_path):
    torch.manual_seed(0)
    model = models.create("bireal18", stem="imagenet", width=0.25, num_classes=200).eval()
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    sizes = {}
    for parts in ("fp32", "int8"):
        path = exporters.export(
            model, tmp_path / parts, "tflite", input_shape=(3, 64, 64), float_parts=parts
        )
        sizes[parts] = (path / "model.tflite").stat().st_size
    # the float weights (stem, 1x1 shortcuts, classifier) go from 4 bytes to 1, plus a scale
    # and a zero point per channel
    float_weights = sum(
        m.weight.numel()
        for m in model.modules()
        if type(m) in (nn.Conv2d, nn.Linear) and m.weight.numel() >= 64
    )
    assert sizes["fp32"] - sizes["int8"] >= 0.9 * 3 * float_weights
    # the same int8 weights, dequantized per channel, as ONNX Runtime runs them
    reference = exporters.export(
        model, tmp_path / "trt", "onnx-trt", input_shape=(3, 64, 64), float_parts="int8"
    )
    want = runtime.load(reference).predict(x)
    got = runtime.load(tmp_path / "int8").predict(x)
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_a_layer_the_writer_does_not_know_is_refused_before_writing(tmp_path):
    model = models.create("sofar_drf", attention="aw", columns=2).eval()  # per-sample weights
    with pytest.raises(ExportError) as err:
        exporters.export(model, tmp_path / "a", "tflite", input_shape=(3, 32, 32))
    message = str(err.value)
    assert "\n" not in message and "no translation for ONNX op" in message
    assert "--format onnx-portable" in message
    assert not (tmp_path / "a").exists()


def test_missing_tflite_packages_say_how_to_get_them(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = models.create("bireal18", width=0.125).eval()
    path = exporters.export(model, tmp_path / "a", "tflite", input_shape=(3, 32, 32))
    monkeypatch.setattr(runtime, "TFLITE_RUNTIMES", ("no_such_litert.interpreter",))
    with pytest.raises(RuntimeLoadError) as err:
        runtime.load(path)
    assert "pip install 'bitfleet[tflite]'" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # the writer's schema module
    with pytest.raises(TFLiteUnavailable, match=r"pip install 'bitfleet\[tflite\]'"):
        exporters.export(model, tmp_path / "b", "tflite", input_shape=(3, 32, 32))
    assert not (tmp_path / "b").exists()


def test_a_tampered_tflite_artifact_is_refused(tmp_path):
    torch.manual_seed(0)
    model = models.create("bireal18", width=0.125).eval()
    path = exporters.export(model, tmp_path / "a", "tflite", input_shape=(3, 32, 32))
    data = bytearray((path / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(exporters.artifact.ArtifactError, match="does not match the SHA-256"):
        runtime.load(path)
