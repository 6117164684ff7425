"""Op counting: Bi-Real paper numbers, float ResNet, and LeNet-5 counted by hand."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import models


def rel(a: float, b: float) -> float:
    return abs(a - b) / b


@pytest.fixture(scope="module")
def bireal18_imagenet():
    model = models.create("bireal18", stem="imagenet", num_classes=1000)
    return model, models.count_ops(model, (1, 3, 224, 224))


def test_bireal18_matches_the_paper(bireal18_imagenet):
    # Bi-Real Net (Liu et al. 2018), Table 4: BOPs 1.68e9, FLOPs 1.39e8, OPs 1.63e8
    _, count = bireal18_imagenet
    assert rel(count.bops, 1.68e9) < 0.05
    assert rel(count.flops, 1.39e8) < 0.05
    assert rel(count.ops, 1.63e8) < 0.05
    assert count.ops == count.flops + count.bops / 64


def test_bireal18_layer_breakdown(bireal18_imagenet):
    model, count = bireal18_imagenet
    binary = [layer for layer in count.layers if layer.binary]
    assert len(binary) == 16
    assert all(layer.kind == "conv" for layer in binary)
    # the stem conv (7x7/2, 3->64 at 112x112) is float and counted exactly
    stem = next(layer for layer in count.layers if layer.name == "stem.0")
    assert not stem.binary
    assert stem.macs == 64 * 3 * 7 * 7 * 112 * 112
    assert stem.output_shape == (64, 112, 112)
    classifier = next(layer for layer in count.layers if layer.name == "classifier")
    assert classifier.kind == "linear" and classifier.macs == 512 * 1000
    # totals are the sums of the layers
    assert count.bops == sum(layer.macs for layer in binary)
    assert count.flops == sum(layer.macs for layer in count.layers if not layer.binary)


def test_bireal34_matches_the_paper():
    # Bi-Real Net, Table 4: OPs 1.93e8
    count = models.count_ops(models.create("bireal34", stem="imagenet", num_classes=1000))
    assert rel(count.ops, 1.93e8) < 0.05
    assert sum(layer.binary for layer in count.layers) == 32


def test_float_resnet18_has_no_bops():
    count = models.count_ops(models.create("resnet18", stem="imagenet", num_classes=1000))
    assert count.bops == 0
    assert rel(count.flops, 1.81e9) < 0.05
    assert count.ops == count.flops


@pytest.mark.parametrize("image_size", [32, 28])
def test_lenet5_counted_by_hand(image_size):
    model = models.create("lenet5", image_size=image_size)
    count = models.count_ops(model, (1, 1, image_size, image_size))
    # both sizes reach 28x28 after conv1 (28x28 inputs are padded by 2), then 10x10, then 5x5
    expected_macs = {
        "features.0": 6 * 1 * 25 * 28 * 28,
        "features.3": 16 * 6 * 25 * 10 * 10,
        "classifier.0": 16 * 5 * 5 * 120,
        "classifier.2": 120 * 84,
        "classifier.4": 84 * 10,
    }
    assert {layer.name: layer.macs for layer in count.layers} == expected_macs
    assert count.flops == sum(expected_macs.values()) == 416_520
    assert count.bops == 0
    expected_params = {
        "features.0": 6 * 25 + 6,
        "features.3": 16 * 6 * 25 + 16,
        "classifier.0": 400 * 120 + 120,
        "classifier.2": 120 * 84 + 84,
        "classifier.4": 84 * 10 + 10,
    }
    assert {layer.name: layer.params for layer in count.layers} == expected_params
    assert count.params == sum(expected_params.values()) == 61_706


@pytest.mark.parametrize(
    "name,expected",
    [
        # torchvision's published counts for ImageNet (1000 classes); Bi-Real Net has the same
        # weights layer for layer (its real-valued shortcuts add none; latent weights count)
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("bireal18", 11_689_512),
        ("bireal34", 21_797_672),
    ],
)
def test_params_match_the_published_counts(name, expected):
    model = models.create(name, stem="imagenet", num_classes=1000)
    assert models.count_ops(model, (1, 3, 64, 64)).params == expected  # any input size


def test_small_net_counted_by_hand():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8 x 8 x 8 outputs
        nn.BatchNorm2d(8),  # 16 parameters, no MACs
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2, bias=False),  # 8 x 6 x 6 outputs, 4 inputs per group
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    count = models.count_ops(net, (1, 3, 8, 8))
    layers = {layer.name: layer for layer in count.layers}
    assert list(layers) == ["0", "3", "6"]
    assert [layers[n].params for n in layers] == [224, 288, 90]  # 8*3*9 + 8, 8*4*9, 8*10 + 10
    assert [layers[n].macs for n in layers] == [13_824, 10_368, 80]  # 512*27, 288*36, 8*10
    assert [layers[n].output_shape for n in layers] == [(8, 8, 8), (8, 6, 6), (10,)]
    assert [layers[n].kind for n in layers] == ["conv", "conv", "linear"]
    assert count.params == 618  # 224 + 16 + 288 + 90: batch norm counts in the total
    assert (count.flops, count.bops) == (24_272, 0)


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_has_flops_and_bops_only_if_binary(name):
    takes_width = "width" in inspect.signature(models.model_entry(name).factory).parameters
    model = models.create(name, **({"width": 0.25} if takes_width else {}))
    shape = (1, 1, 32, 32) if name == "lenet5" else (1, 3, 32, 32)
    count = models.count_ops(model, shape)
    assert count.params > 0 and count.flops > 0
    binary = any(getattr(m, "is_binary", False) for m in model.modules())
    assert (count.bops > 0) == binary
    assert binary == (name.startswith(("bireal", "binarydensenet", "sofar", "nasb")))  # binaries


def test_batch_is_divided_out_and_mode_restored():
    model = models.create("bireal18", width=0.25)
    model.train()
    one = models.count_ops(model, (1, 3, 32, 32))
    four = models.count_ops(model, (4, 3, 32, 32))
    assert (one.flops, one.bops) == (four.flops, four.bops)
    assert model.training  # count_ops runs in eval mode and restores the mode
    # no hooks are left behind
    assert all(not m._forward_hooks for m in model.modules())


def test_to_dict():
    count = models.count_ops(models.create("lenet5"), (1, 1, 32, 32))
    plain = count.to_dict()
    assert set(plain) == {"params", "flops", "bops", "ops"}
    detailed = count.to_dict(per_layer=True)
    assert len(detailed["layers"]) == 5
    assert detailed["layers"][0]["name"] == "features.0"


def test_binary_layer_counts_as_bops_only_when_both_sides_are_binary():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weights_only = models.BinaryConv2d(3, 4, 3, padding=1, kernel_quantizer="ste_sign")
            self.both = models.BinaryConv2d(
                4, 4, 3, padding=1, input_quantizer="ste_sign", kernel_quantizer="ste_sign"
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.both(self.weights_only(x))

    count = models.count_ops(Net(), (1, 3, 8, 8))
    assert count.flops == 4 * 3 * 9 * 64
    assert count.bops == 4 * 4 * 9 * 64
