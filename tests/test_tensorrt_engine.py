"""Format ``tensorrt``: an engine needs NVIDIA's tensorrt and a GPU, and says so when missing."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import exporters
import models
from exporters import runtime
from exporters.artifact import ArtifactError, write_artifact
from exporters.tensorrt_engine import TensorRTUnavailable
from toolkit.cli import app

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NEEDS_GPU = "needs NVIDIA's tensorrt and a CUDA GPU (a Jetson, or a desktop with one)"


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the engine tests below run")
def test_export_without_tensorrt_is_one_line_and_writes_nothing(tmp_path):
    model = models.create("bireal18", width=0.125).eval()
    with pytest.raises(TensorRTUnavailable, match="needs NVIDIA's tensorrt Python package") as err:
        exporters.export(model, tmp_path / "engine", "tensorrt", input_shape=(3, 32, 32))
    assert "\n" not in str(err.value) and "--format onnx-trt" in str(err.value)
    assert not (tmp_path / "engine").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary leftovers either


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the engine tests below run")
def test_cli_export_without_tensorrt(tmp_path):
    torch.manual_seed(0)
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "--model", "lenet5", "--dataset", "digits", "--epochs", "1", "--out", str(run)]
        + ["--no-progress"],
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["export", str(run), "--format", "tensorrt"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "tensorrt" in lines[0]


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the engine tests below run")
def test_loading_an_engine_without_tensorrt_is_one_line(tmp_path):
    manifest = {
        "name": "x",
        "version": "1",
        "format": "tensorrt",
        "model_file": "model.engine",
        "input": {"name": "input", "shape": [None, 3, 32, 32], "dtype": "float32"},
        "output": {"name": "logits", "dtype": "float32"},
        "tensorrt": {"version": "10.3.0", "precision": ["int8", "fp16"], "max_batch": 8},
    }
    path = write_artifact(tmp_path / "e", {"model.engine": b"\x00" * 64}, manifest)
    with pytest.raises(runtime.RuntimeLoadError, match="is a TensorRT engine: .* needs NVIDIA"):
        runtime.load(path)
    # a damaged engine is caught by its checksum before anything tries to load it
    (path / "model.engine").write_bytes(b"\x01" * 64)
    with pytest.raises(ArtifactError, match="SHA-256"):
        runtime.load(path)
    assert json.loads((path / "manifest.json").read_text())["format"] == "tensorrt"


@pytest.mark.skipif(not HAS_TENSORRT, reason=NEEDS_GPU)
def test_engine_matches_the_onnx_trt_graph(tmp_path):  # pragma: no cover - needs a GPU
    torch.manual_seed(0)
    model = models.create("bireal18", width=0.25, num_classes=10).eval()
    engine = exporters.export(model, tmp_path / "engine", "tensorrt", input_shape=(3, 32, 32))
    graph = exporters.export(model, tmp_path / "graph", "onnx-trt", input_shape=(3, 32, 32))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    want = runtime.load(graph).predict(x)
    got = runtime.load(engine).predict(x)
    # FP16 float parts: logits within 1% of their scale, the same decisions
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).all()
