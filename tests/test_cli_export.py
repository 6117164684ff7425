import json

import numpy as np
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


@pytest.mark.parametrize("fmt", ["onnx", "onnx-portable", "onnx-trt"])
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
        app, ["export", str(run_dir), "--format", "coreml", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1
    assert "unknown format 'coreml'" in result.output and "Traceback" not in result.output
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
    assert any(step.startswith(("ort[", "numpy[")) for step in doc["per_layer_ms"])
    from exporters import kernels

    assert doc["kernels_isa"] == kernels.backend()


def test_bench_bad_threads():
    result = runner.invoke(app, ["bench", "lenet5", "--threads", "0"])
    assert result.exit_code == 1 and "--threads" in result.output


def test_export_shape_must_agree_with_the_checkpoint(run_dir, tmp_path):
    def export(*args):
        return runner.invoke(app, ["export", str(run_dir), *args])

    # channels: never
    result = export("--input-shape", "1,32,32", "--out", str(tmp_path / "a"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "takes 3-channel input, not 1" in result.output
    # another size: refused unless asked for, since the checkpoint records 32x32
    result = export("--input-shape", "3,64,64", "--out", str(tmp_path / "b"))
    assert result.exit_code == 1 and "--allow-resize" in result.output
    assert not (tmp_path / "b").exists()
    # bireal18 pools globally (no image_size in its spec), so it may be exported at 64x64
    result = export("--input-shape", "3,64,64", "--allow-resize", "--out", str(tmp_path / "c"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["input"]["shape"] == [
        None,
        3,
        64,
        64,
    ]
    from exporters import runtime

    logits = runtime.load(tmp_path / "c", threads=1).predict(np.zeros((2, 3, 64, 64), np.float32))
    assert logits.shape == (2, 10)


def test_export_api_checks_shape_and_destination(run_dir, tmp_path):
    import exporters
    import models
    from exporters.onnx_writer import ExportError

    with pytest.raises(ExportError, match="3-channel"):
        exporters.export(run_dir, tmp_path / "a", input_shape=(1, 32, 32))
    with pytest.raises(ExportError, match="allow_resize=True"):
        exporters.export(run_dir, tmp_path / "b", input_shape=(3, 64, 64))
    lenet = models.create("lenet5")  # its classifier is sized for 32x32: never resized
    with pytest.raises(ExportError, match="fixes image_size"):
        exporters.export(lenet, tmp_path / "c", input_shape=(1, 8, 8), allow_resize=True)
    with pytest.raises(ExportError, match="three positive integers"):
        exporters.export(lenet, tmp_path / "d", input_shape=(1, 32))
    # never over the checkpoint itself, nor over what is not an artifact
    with pytest.raises(ExportError, match="checkpoint being exported"):
        exporters.export(run_dir, run_dir, overwrite=True)
    with pytest.raises(ExportError, match="checkpoint being exported"):
        exporters.export(run_dir, run_dir.parent, overwrite=True)
    assert (run_dir / "spec.json").is_file() and (run_dir / "model.safetensors").is_file()
    notes = tmp_path / "notes"
    notes.mkdir()
    with pytest.raises(ExportError, match="not an artifact"):
        exporters.export(run_dir, notes, overwrite=True)
    assert notes.is_dir()


def test_int8_float_parts_cost_little_accuracy_and_a_lot_of_size(run_dir, tmp_path):
    from exporters import runtime
    from toolkit.data import load_dataset

    data = load_dataset("digits", "test", channels=3)
    accuracy, sizes = {}, {}
    for parts in ("fp32", "int8"):
        out = tmp_path / parts
        result = runner.invoke(
            app, ["export", str(run_dir), "--float-parts", parts, "--out", str(out), "--json"]
        )
        assert result.exit_code == 0, result.output
        manifest = json.loads(result.stdout)
        assert manifest["float_parts"] == parts
        sizes[parts] = manifest["sizes"]["model.onnx"]
        logits = runtime.load(out, threads=1).predict(data.x)
        accuracy[parts] = float((logits.argmax(1) == data.y).mean())
    assert sizes["int8"] < sizes["fp32"]
    assert accuracy["int8"] >= accuracy["fp32"] - 0.02, accuracy


def test_bad_float_parts_is_one_line(run_dir, tmp_path):
    result = runner.invoke(
        app, ["export", str(run_dir), "--float-parts", "int4", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1
    assert "unknown float_parts 'int4'; use one of fp32, int8" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("form", ["int8", "float"])
def test_tflite_matches_pytorch_on_the_digits_test_set(run_dir, tmp_path, form):
    import torch

    from exporters import runtime
    from models.checkpoint import load as load_checkpoint
    from toolkit.data import load_dataset

    data = load_dataset("digits", "test", channels=3)
    out = tmp_path / form
    result = runner.invoke(
        app,
        [
            "export",
            str(run_dir),
            "--format",
            "tflite",
            "--binary-form",
            form,
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["format"] == "tflite" and manifest["model_file"] == "model.tflite"
    assert manifest["tflite"]["binary_layers"] == {form: 16}
    assert manifest["labels"] and manifest["input"]["normalisation"]
    got = runtime.load(out, threads=1).predict(data.x)
    with torch.no_grad():
        want = load_checkpoint(run_dir).model.eval()(torch.from_numpy(data.x)).numpy()
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    shown = runner.invoke(app, ["inspect", str(out)], env={"COLUMNS": "200"})
    assert f"16 {form} (--binary-form {form})" in shown.output and "float parts" in shown.output


def test_binary_form_goes_with_tflite_only(run_dir, tmp_path):
    result = runner.invoke(
        app, ["export", str(run_dir), "--binary-form", "int8", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1
    assert "binary_form applies to the tflite format only" in result.output
    result = runner.invoke(
        app,
        [
            "export",
            str(run_dir),
            "--format",
            "tflite",
            "--binary-form",
            "int2",
            "--out",
            str(tmp_path / "y"),
        ],
    )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "unknown binary form 'int2'; use one of auto, float, int8, int4" in lines[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
