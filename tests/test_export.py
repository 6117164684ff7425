"""Export parity: PyTorch, portable ONNX and fast ONNX agree on every registered binary model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import exporters
import models
from exporters import runtime
from exporters.artifact import ArtifactError
from exporters.onnx_writer import ExportError, to_onnx
from models import quantizers
from toolkit.data import load_dataset

BINARY_MODELS = [
    name
    for name in models.list_models()
    if any(getattr(m, "is_binary", False) for m in models.create(name).modules())
]


def _randomize_batch_norm(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


@pytest.fixture(scope="module")
def digits_test():
    return load_dataset("digits", "test", channels=3).x


def test_registry_has_binary_models():
    assert {"bireal18", "bireal34"} <= set(BINARY_MODELS)


@pytest.mark.parametrize("name", BINARY_MODELS)
@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_pytorch_portable_and_fast_agree_on_digits(name, stem, digits_test, tmp_path):
    torch.manual_seed(0)
    model = models.create(name, stem=stem, width=0.125, num_classes=10).eval()
    _randomize_batch_norm(model)
    x = digits_test[:96] if stem == "cifar" else digits_test
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    scale = np.abs(expected).max()
    for flavour in ("onnx-portable", "onnx", "onnx-trt"):
        path = exporters.export(model, tmp_path / flavour, flavour, input_shape=(3, 32, 32))
        got = runtime.load(path, threads=1).predict(x)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4 * scale, flavour
        # same decision wherever the decision is not a float tie
        top2 = np.sort(expected, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 1e-4 * scale
        assert (got.argmax(1) == expected.argmax(1))[clear].all(), flavour


def test_fast_flavour_folds_batch_norm_and_shortcuts():
    model = models.create("bireal18", stem="imagenet", width=0.125).eval()
    proto = to_onnx(model, (3, 32, 32), "onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("BinaryConv2d") == 16
    # every Bi-Real unit's BN and shortcut add live in the binary node: only the float BNs
    # (stem, three downsampling shortcuts) remain, and no Add at all
    assert ops.count("BatchNormalization") == 4
    assert "Add" not in ops
    residual_inputs = [
        n for n in proto.graph.node if n.op_type == "BinaryConv2d" and len(n.input) == 5
    ]
    assert len(residual_inputs) == 16


def test_portable_uses_only_standard_ops_and_passes_full_check(tmp_path):
    model = models.create("bireal18", stem="imagenet", width=0.125).eval()
    path = exporters.export(model, tmp_path / "p", "onnx-portable", input_shape=(3, 32, 32))
    proto = onnx.load(str(path / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    # packed weights are uint8 initializers
    packed = [i for i in proto.graph.initializer if i.name.endswith("packed_weight")]
    assert len(packed) == 16 and all(i.data_type == onnx.TensorProto.UINT8 for i in packed)
    # stock onnxruntime, no bitfleet code
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})[0]
    assert out.shape == (2, 10)


def test_binary_weights_are_packed_32x():
    model = models.create("bireal18", stem="imagenet", width=0.25).eval()
    proto = to_onnx(model, (3, 32, 32), "onnx")
    packed = {i.name: i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.UINT8}
    latent = sum(m.weight.numel() for m in model.modules() if getattr(m, "is_binary", False))
    packed_bytes = sum(len(i.raw_data) for i in packed.values())
    assert packed_bytes * 8 >= latent  # every weight has a bit
    assert packed_bytes * 8 <= latent * 1.05  # padding only to whole 64-bit words


def test_unknown_layer_is_refused_with_its_type():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.w

    model = models.create("lenet5")
    model.features[1] = Odd()
    with pytest.raises(ExportError, match="features.1.*Odd.*does not know"):
        to_onnx(model, (1, 32, 32), "onnx")


def test_unknown_format_and_missing_shape(tmp_path):
    model = models.create("lenet5")
    with pytest.raises(ExportError, match="unknown format 'coreml'"):
        exporters.export(model, tmp_path / "a", "coreml", input_shape=(1, 32, 32))
    bare = models.create("bireal18")
    with pytest.raises(ExportError, match="input shape is unknown"):
        exporters.export(bare, tmp_path / "b", "onnx")


def test_export_from_run_directory_carries_metadata(tmp_path):
    from toolkit.train import TrainConfig, train

    train(TrainConfig(model="lenet5", epochs=1), tmp_path / "run", progress=False)
    path = exporters.export(tmp_path / "run", tmp_path / "art", "onnx")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["input"]["shape"] == [None, 1, 32, 32]
    assert manifest["labels"] == [str(i) for i in range(10)]
    assert len(manifest["input"]["normalisation"]["mean"]) == 1
    assert manifest["spec"]["name"] == "lenet5"
    assert manifest["format"] == "onnx" and manifest["custom_ops"] == []
    assert set(manifest["files"]) == {"model.onnx"}
    with pytest.raises(FileExistsError, match="--overwrite"):
        exporters.export(tmp_path / "run", tmp_path / "art", "onnx")
    exporters.export(tmp_path / "run", tmp_path / "art", "onnx", overwrite=True)


def test_runtime_never_imports_torch(tmp_path):
    model = models.create("bireal18", stem="imagenet", width=0.125).eval()
    for flavour in ("onnx", "onnx-portable"):
        exporters.export(model, tmp_path / flavour, flavour, input_shape=(3, 32, 32))
    code = (
        "import sys, numpy as np\n"
        "from exporters import runtime\n"
        f"for f in ('onnx', 'onnx-portable'):\n"
        f"    p = runtime.load(r'{tmp_path}/' + f, threads=1)\n"
        "    assert p.predict(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 10)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


class TestBadArtifacts:
    @pytest.fixture()
    def artifact(self, tmp_path):
        model = models.create("bireal18", stem="imagenet", width=0.125).eval()
        return exporters.export(model, tmp_path / "art", "onnx", input_shape=(3, 32, 32))

    def test_round_trip_and_tar(self, artifact, tmp_path):
        import tarfile

        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
        direct = runtime.load(artifact).predict(x)
        tar = tmp_path / "art.tar"
        with tarfile.open(tar, "w") as archive:
            archive.add(artifact, arcname="art")
        assert np.array_equal(runtime.load(tar).predict(x), direct)

    def test_tampered_file(self, artifact):
        data = bytearray((artifact / "model.onnx").read_bytes())
        data[-5] ^= 0xFF
        (artifact / "model.onnx").write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="does not match the SHA-256"):
            runtime.load(artifact)

    def test_missing_file(self, artifact):
        (artifact / "model.onnx").unlink()
        with pytest.raises(ArtifactError, match="missing model.onnx"):
            runtime.load(artifact)

    def test_unknown_format_version(self, artifact):
        manifest = json.loads((artifact / "manifest.json").read_text())
        manifest["format_version"] = "bitfleet-artifact/99"
        (artifact / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match="format version 'bitfleet-artifact/99'"):
            runtime.load(artifact)

    def test_custom_op_the_runtime_lacks(self, artifact):
        from bitfleet.fsutil import sha256_file

        proto = onnx.load(str(artifact / "model.onnx"))
        node = next(n for n in proto.graph.node if n.op_type == "BinaryConv2d")
        node.op_type = "TernaryConv2d"
        onnx.save(proto, str(artifact / "model.onnx"))
        manifest = json.loads((artifact / "manifest.json").read_text())
        manifest["files"]["model.onnx"] = sha256_file(artifact / "model.onnx")
        (artifact / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match="bitfleet.TernaryConv2d"):
            runtime.load(artifact)

    def test_wrong_input_shape(self, artifact):
        predictor = runtime.load(artifact)
        with pytest.raises(
            ValueError, match=r"does not fit this model, which takes \(N, 3, 32, 32\)"
        ):
            predictor.predict(np.zeros((1, 1, 32, 32), np.float32))
        assert predictor.predict(np.zeros((3, 32, 32), np.float32)).shape == (1, 10)

    def test_not_an_artifact(self, tmp_path):
        with pytest.raises(ArtifactError, match="no manifest.json"):
            runtime.load(tmp_path)
        with pytest.raises(ArtifactError, match="does not exist"):
            runtime.load(tmp_path / "nope")


# --- a quantizer the writer has never heard of, defined here and registered by name ---------


class _TanhSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x < 0, -1.0, 1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1.0 - torch.tanh(x) ** 2)


class TanhSign(quantizers.Quantizer):
    """sign(x), sign(0) = +1, with tanh's derivative as pseudo-gradient."""

    name = "test_tanh_sign"
    binary = True

    def forward(self, x):
        return _TanhSignFn.apply(x)


class RmsScaledSign(quantizers.Quantizer):
    """sign(w) times the root mean square of each output channel's latent weights."""

    name = "test_rms_scaled_sign"
    binary = True
    per_channel_scale = True

    def factorize(self, x):
        scale = x.detach().pow(2).mean(dim=tuple(range(1, x.dim()))).sqrt()
        return _TanhSignFn.apply(x), scale

    def forward(self, x):
        values, scale = self.factorize(x)
        return values * scale.view(-1, *[1] * (x.dim() - 1))


class OffsetSign(quantizers.Quantizer):
    """Declared binary but thresholds at 0.25: the writer must notice and refuse it."""

    name = "test_offset_sign"
    binary = True

    def forward(self, x):
        return torch.where(x < 0.25, -1.0, 1.0)


@pytest.fixture()
def new_quantizers():
    made = (TanhSign, RmsScaledSign, OffsetSign)
    for cls in made:
        quantizers.register(cls)
    yield
    for cls in made:
        quantizers.unregister(cls.name)


def _tiny_net_with_new_quantizers() -> torch.nn.Module:
    from models.layers import BinaryConv2d, BinaryLinear

    torch.manual_seed(3)
    net = torch.nn.Sequential(
        BinaryConv2d(3, 16, 3, padding=1, bias=False, kernel_quantizer="test_rms_scaled_sign"),
        torch.nn.BatchNorm2d(16),
        BinaryConv2d(  # even kernel, 'same': padding (left 0, right 1, top 0, bottom 1)
            16,
            16,
            2,
            padding="same",
            bias=False,
            input_quantizer="test_tanh_sign",
            kernel_quantizer="test_rms_scaled_sign",
        ),
        torch.nn.BatchNorm2d(16),
        BinaryConv2d(
            16,
            8,
            3,
            stride=2,
            padding=1,
            input_quantizer="test_tanh_sign",
            kernel_quantizer={"name": "test_rms_scaled_sign"},
        ),
        torch.nn.Flatten(),
        BinaryLinear(
            8 * 4 * 4, 10, input_quantizer="test_tanh_sign", kernel_quantizer="test_tanh_sign"
        ),
    ).eval()
    _randomize_batch_norm(net, seed=4)
    return net


@pytest.mark.parametrize("flavour", ["onnx", "onnx-portable"])
def test_new_registered_quantizer_exports_with_parity(new_quantizers, flavour, tmp_path):
    from exporters.artifact import write_artifact

    net = _tiny_net_with_new_quantizers()
    assert net[2].quantizer_config()["kernel_quantizer"] == "test_rms_scaled_sign"
    x = np.random.default_rng(5).standard_normal((16, 3, 8, 8)).astype(np.float32)
    x[:, :, ::3, ::2] = 0.0  # zeros binarize to +1 on both sides
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    proto = to_onnx(net, (3, 8, 8), flavour)
    ops = [n.op_type for n in proto.graph.node]
    if flavour == "onnx":
        # the weights-only first conv is a standard Conv, its batch norm stays; the other one
        # folds into the binary node
        assert ops.count("BinaryConv2d") == 2 and ops.count("BinaryDense") == 1
        assert ops.count("BatchNormalization") == 1
    else:
        assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    manifest = {
        "name": "tiny",
        "format": flavour,
        "model_file": "model.onnx",
        "input": {"name": "input", "shape": [None, 3, 8, 8], "dtype": "float32"},
    }
    path = write_artifact(tmp_path / flavour, {"model.onnx": proto.SerializeToString()}, manifest)
    got = runtime.load(path, threads=1).predict(x)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale


def test_quantizers_that_are_not_binary_are_refused(new_quantizers):
    from models.layers import BinaryConv2d

    class HalfSign(quantizers.Quantizer):  # registered nowhere, declares nothing
        name = "half_sign"

        def forward(self, x):
            return 0.5 * quantizers.sign(x)

    offset = BinaryConv2d(2, 2, 3, input_quantizer="test_offset_sign", kernel_quantizer="ste_sign")
    with pytest.raises(ExportError, match="input quantizer OffsetSign.*test_tanh_sign"):
        to_onnx(torch.nn.Sequential(offset), (2, 5, 5), "onnx")
    scaled = BinaryConv2d(
        2, 2, 3, input_quantizer="magnitude_aware_sign", kernel_quantizer="ste_sign"
    )
    with pytest.raises(ExportError, match="input quantizer MagnitudeAwareSign"):
        to_onnx(torch.nn.Sequential(scaled), (2, 5, 5), "onnx")
    half = BinaryConv2d(2, 2, 3, input_quantizer="ste_sign", kernel_quantizer=HalfSign())
    with pytest.raises(ExportError, match="kernel quantizer HalfSign.*declared `binary`"):
        to_onnx(torch.nn.Sequential(half), (2, 5, 5), "onnx-portable")


def _tiny_dense_net() -> torch.nn.Module:
    """Binary dense layers only, with the registered quantizers, widths off the 64-bit words."""
    from models.layers import BinaryLinear

    torch.manual_seed(7)
    net = torch.nn.Sequential(
        torch.nn.Flatten(),
        BinaryLinear(3 * 4 * 4, 40, kernel_quantizer="ste_sign"),  # float inputs, 1-bit weights
        torch.nn.BatchNorm1d(40),
        BinaryLinear(40, 24, input_quantizer="ste_sign", kernel_quantizer="magnitude_aware_sign"),
        torch.nn.BatchNorm1d(24),
        BinaryLinear(24, 10, bias=False, input_quantizer="ste_sign", kernel_quantizer="ste_sign"),
    ).eval()
    g = torch.Generator().manual_seed(8)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return net


@pytest.mark.parametrize("flavour", ["onnx", "onnx-portable"])
def test_binary_linear_exports_with_parity(flavour, tmp_path):
    from exporters.artifact import write_artifact

    net = _tiny_dense_net()
    x = np.random.default_rng(9).standard_normal((32, 3, 4, 4)).astype(np.float32)
    x[:, :, ::2, 1::2] = 0.0  # zeros binarize to +1 on both sides
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    proto = to_onnx(net, (3, 4, 4), flavour)
    ops = [n.op_type for n in proto.graph.node]
    if flavour == "onnx":
        # the two layers with binarized inputs become packed-bit kernels
        assert ops.count("BinaryDense") == 2, ops
    else:
        assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), ops
    manifest = {
        "name": "dense",
        "format": flavour,
        "model_file": "model.onnx",
        "input": {"name": "input", "shape": [None, 3, 4, 4], "dtype": "float32"},
    }
    path = write_artifact(tmp_path / flavour, {"model.onnx": proto.SerializeToString()}, manifest)
    got = runtime.load(path, threads=1).predict(x)
    assert got.shape == expected.shape == (32, 10)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale
