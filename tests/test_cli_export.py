import json

import pytest
from typer.testing import CliRunner

from toolkit.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            "bireal18",
            "--stem",
            "imagenet",
            "--width",
            "0.125",
            "--channels",
            "3",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("fmt", ["onnx", "onnx-portable"])
def test_export_then_inspect(run_dir, fmt):
    result = runner.invoke(app, ["export", str(run_dir), "--format", fmt, "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["format"] == fmt
    assert manifest["artifact"].endswith(f"artifact-{fmt}")
    result = runner.invoke(app, ["inspect", manifest["artifact"], "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verified"] is True
    result = runner.invoke(app, ["inspect", manifest["artifact"]])
    assert "checksums verified" in result.output


def test_export_bad_input(run_dir, tmp_path):
    result = runner.invoke(
        app, ["export", str(run_dir), "--format", "tflite", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1
    assert "unknown format 'tflite'" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "does not exist" in result.output
    result = runner.invoke(app, ["export", str(run_dir), "--input-shape", "3x32x32"])
    assert result.exit_code == 1 and "--input-shape must be C,H,W" in result.output


def test_inspect_tampered(run_dir, tmp_path):
    out = tmp_path / "art"
    assert runner.invoke(app, ["export", str(run_dir), "--out", str(out)]).exit_code == 0
    model = out / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 1 and "SHA-256" in result.output


def test_bench_json(run_dir):
    result = runner.invoke(
        app, ["bench", str(run_dir), "--repeats", "2", "--warmup", "1", "--per-layer", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    row = doc["threads"]["1"]
    assert row["onnx_ms"] > 0 and row["fp32_ms"] > 0 and row["speedup_vs_fp32"] > 0
    assert doc["sizes_bytes"]["fp32"] > doc["sizes_bytes"]["onnx"]
    assert any(step.startswith("ort[") for step in doc["per_layer_ms"])


def test_bench_bad_threads():
    result = runner.invoke(app, ["bench", "lenet5", "--threads", "0"])
    assert result.exit_code == 1 and "--threads" in result.output
