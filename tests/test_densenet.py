"""BinaryDenseNet: Larq zoo's layouts, counts, shapes, spec round trip and export parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import exporters
import models
from exporters import runtime
from models.densenet import DenseLayer, Reduction, reduced_channels

DENSENETS = ["binarydensenet28", "binarydensenet37"]


def _randomize_batch_norm(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


@pytest.mark.parametrize(
    "name,layers,expected",
    # Larq zoo's published parameter counts (Keras counts BN's moving mean and variance too)
    [("binarydensenet28", 23, 5_150_504), ("binarydensenet37", 32, 8_734_120)],
)
def test_imagenet_layout_matches_larq_zoo(name, layers, expected):
    model = models.create(name, stem="imagenet", num_classes=1000)
    dense = [m for m in model.modules() if isinstance(m, DenseLayer)]
    assert len(dense) == layers
    binary = [m for m in model.modules() if getattr(m, "is_binary", False)]
    assert len(binary) == layers and all(m.out_channels == 64 for m in binary)
    assert all(m.latent_clip == 1.3 for m in binary)
    running = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(p.numel() for p in model.parameters()) + running == expected
    # reductions: max-pool then a float 1x1 conv to round(C // r / 32) * 32 channels
    reductions = [m for m in model.modules() if isinstance(m, Reduction)]
    assert len(reductions) == 3
    assert not any(getattr(r.conv, "is_binary", False) for r in reductions)
    assert all(isinstance(r.pool, nn.MaxPool2d) for r in reductions)


def test_binarydensenet28_channels_by_hand():
    model = models.create("binarydensenet28", stem="imagenet", num_classes=1000)
    reductions = [m for m in model.modules() if isinstance(m, Reduction)]
    # 64 + 6*64 = 448 -> 160; 160 + 384 = 544 -> 192; 192 + 384 = 576 -> 256; 256 + 5*64 = 576
    assert [(r.conv.in_channels, r.conv.out_channels) for r in reductions] == [
        (448, 160),
        (544, 192),
        (576, 256),
    ]
    assert model.classifier.in_features == 576
    assert reduced_channels(448, 2.7) == 160
    assert reduced_channels(10, 4.0) == 32  # never zero channels


def test_binarydensenet28_ops_at_224():
    count = models.count_ops(models.create("binarydensenet28", stem="imagenet", num_classes=1000))
    # stem 7x7 conv: 64 * 3 * 49 * 112 * 112; first dense layer: 64 * 64 * 9 * 56 * 56
    by_name = {layer.name: layer for layer in count.layers}
    assert by_name["stem.0"].macs == 64 * 3 * 49 * 112 * 112
    assert by_name["features.0.new.conv"].macs == 64 * 64 * 9 * 56 * 56
    assert by_name["features.0.new.conv"].binary
    assert abs(count.ops - 2.585e8) / 2.585e8 < 0.01
    assert count.bops == sum(layer.macs for layer in count.layers if layer.binary)


@pytest.mark.parametrize("name", DENSENETS)
@pytest.mark.parametrize("stem,size", [("cifar", 32), ("imagenet", 64)])
def test_forward_shapes(name, stem, size):
    model = models.create(name, stem=stem, width=0.125, in_channels=1, num_classes=7)
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)


def test_width_and_growth_arguments():
    wide = models.create("binarydensenet28", growth=32)
    assert {m.out_channels for m in wide.modules() if getattr(m, "is_binary", False)} == {32}
    narrow = models.create("binarydensenet28", width=0.25)
    assert narrow.stem[0].out_channels == 16
    assert {m.out_channels for m in narrow.modules() if getattr(m, "is_binary", False)} == {16}
    with pytest.raises(ValueError, match="unknown stem"):
        models.create("binarydensenet28", stem="tiny")


@pytest.mark.parametrize("name", DENSENETS)
def test_spec_round_trip_gives_the_same_outputs(name):
    torch.manual_seed(0)
    model = models.create(name, width=0.125, growth=48, num_classes=5).eval()
    rebuilt = models.build(models.dump_spec(models.spec_of(model), "yaml"))
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert models.spec_of(rebuilt)["args"]["growth"] == 48


@pytest.mark.parametrize("name", DENSENETS)
@pytest.mark.parametrize("flavour", ["onnx", "onnx-portable"])
def test_export_parity(name, flavour, tmp_path):
    torch.manual_seed(1)
    model = models.create(name, width=0.125, num_classes=10).eval()
    _randomize_batch_norm(model)
    x = np.random.default_rng(2).standard_normal((8, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    path = exporters.export(model, tmp_path / flavour, flavour, input_shape=(3, 32, 32))
    got = runtime.load(path, threads=1).predict(x)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale
    assert (got.argmax(1) == expected.argmax(1)).all()
