"""Data-free compression: BN-statistics loss, generators, search, `bitfleet compress`."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import models
from models import checkpoint
from models.training import freeze
from toolkit.cli import app
from toolkit.data import load_dataset
from toolkit.datafree import (
    GENERATOR_OPS,
    BNStatistics,
    GDFQGenerator,
    GeneratorGenotype,
    NoBatchNormError,
    SearchedGenerator,
    fit_generator,
    fit_inputs,
    make_student,
)
from toolkit.datafree.autorecon import random_genotype
from toolkit.datafree.generators import reconstruction_loss
from toolkit.datafree.samples import sample_grid
from toolkit.datafree.students import _unit_name
from toolkit.train import TrainConfig, train

runner = CliRunner()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A small float ResNet-18 trained for one epoch on digits (1 x 32 x 32)."""
    out = tmp_path_factory.mktemp("datafree") / "teacher"
    config = TrainConfig(
        model="resnet18",
        model_args={"width": 0.125, "stem": "imagenet"},
        dataset="digits",
        epochs=2,
        lr=3e-3,
    )
    train(config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return freeze(checkpoint.load(teacher_dir).model)


# ----------------------------------------------------------------------------- BN statistics


def _one_bn_net(channels=3):
    net = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
    nn.init.eye_(net[0].weight.view(channels, channels))
    return net.eval()


def test_bn_loss_is_zero_when_the_batch_statistics_equal_the_running_ones():
    net = _one_bn_net()
    x = torch.randn(32, 3, 5, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 0.3
    bn = net[1]
    bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
    bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    with BNStatistics(net) as bns:
        net(x)
        assert float(bns.loss().detach()) == pytest.approx(0.0, abs=1e-10)


def test_bn_loss_grows_with_the_distance_from_the_running_statistics():
    net = _one_bn_net()
    base = torch.randn(64, 3, 6, 6)
    base = (base - base.mean(dim=(0, 2, 3), keepdim=True)) / base.std(
        dim=(0, 2, 3), keepdim=True, unbiased=False
    )
    losses = []
    with BNStatistics(net) as bns:  # running stats: mean 0, var 1
        for shift in (0.0, 0.5, 1.0, 2.0):
            net(base + shift)
            losses.append(float(bns.loss().detach()))
        net(base * 3.0)
        scaled = float(bns.loss().detach())
    assert losses[0] == pytest.approx(0.0, abs=1e-8)
    assert losses == sorted(losses) and losses[-1] > 3.9  # mean term: shift**2
    assert scaled == pytest.approx((9.0 - 1.0) ** 2, rel=1e-3)  # variance term


def test_bn_loss_averages_over_layers_and_hooks_come_off():
    net = nn.Sequential(_one_bn_net(), nn.BatchNorm2d(3)).eval()
    with BNStatistics(net) as bns:
        assert len(bns.layers) == 2
        net(torch.randn(8, 3, 4, 4) + 1.0)
        two = float(bns.loss().detach())
    assert two > 0
    assert not net[1]._forward_pre_hooks  # detached on exit
    with pytest.raises(NoBatchNormError, match="no batch-norm layers"):
        BNStatistics(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_frozen_targets_stay_put_while_the_running_statistics_move():
    net = _one_bn_net().train()
    bns = BNStatistics(net, frozen=True).attach()
    x = torch.randn(16, 3, 4, 4) + 5.0
    for _ in range(20):
        net(x)
        loss = float(bns.loss().detach())
    bns.detach()
    assert float(net[1].running_mean.mean()) > 4.0  # the buffers followed the data
    assert loss > 20.0  # the targets did not: mean 0, var 1


# -------------------------------------------------------------------------------- generators


@pytest.mark.parametrize("size", [32, 28, 16])
def test_generators_make_normalised_images_of_the_teacher_shape(size):
    for generator in (GDFQGenerator(10, size, 3), SearchedGenerator(10, size, 3)):
        images, labels = generator.sample(8, torch.Generator().manual_seed(0))
        assert images.shape == (8, 3, size, size)
        assert labels.shape == (8,) and int(labels.max()) < 10
        channel_mean = images.mean(dim=(0, 2, 3))
        assert torch.allclose(channel_mean, torch.zeros(3), atol=1e-4)


def _held_out_loss(generator, teacher):
    """The reconstruction loss on fixed noise and labels (steadier than the training losses)."""
    rng = torch.Generator().manual_seed(123)
    z, labels = torch.randn(256, generator.latent_dim, generator=rng), torch.arange(256) % 10
    generator.train()
    with torch.no_grad(), BNStatistics(teacher) as bns:
        logits = teacher(generator(z, labels))
        return float(reconstruction_loss(logits, labels, bns.loss()))


def test_the_generator_loss_falls_over_a_few_steps(teacher):
    torch.manual_seed(0)
    generator = GDFQGenerator(10, 32, 1)
    before = _held_out_loss(generator, teacher)
    stats = fit_generator(generator, teacher, 30, batch_size=32, lr=3e-3, seed=0)
    after = _held_out_loss(generator, teacher)
    assert len(stats.losses) == 30
    assert after < 0.9 * before, (before, after)


def test_the_searched_generator_moves_its_alphas_and_derives_a_genotype(teacher):
    torch.manual_seed(0)
    supernet = SearchedGenerator(10, 32, 1)
    before = supernet.alphas_ops.detach().clone()
    loss_before = _held_out_loss(supernet, teacher)
    fit_generator(
        supernet,
        teacher,
        20,
        batch_size=16,
        lr=3e-3,
        arch_parameters=supernet.arch_parameters(),
        arch_lr=1e-2,
    )
    assert _held_out_loss(supernet, teacher) < 0.9 * loss_before
    assert not torch.allclose(supernet.alphas_ops, before)
    genotype = supernet.derive()
    assert all(op != "none" for cell in genotype.cells for op in cell.edges)
    assert GeneratorGenotype.from_dict(json.loads(genotype.to_json())) == genotype
    derived = SearchedGenerator(10, 32, 1, genotype=genotype)
    assert derived.arch_parameters() == []
    assert derived.sample(4)[0].shape == (4, 1, 32, 32)


def test_alphas_that_favour_an_op_derive_it():
    supernet = SearchedGenerator(10, 16, 3)
    with torch.no_grad():
        supernet.alphas_ops.zero_()
        supernet.alphas_ops[:, :, GENERATOR_OPS.index("none")] = 5.0  # never derived
        supernet.alphas_ops[:, :, GENERATOR_OPS.index("dil_conv_3x3")] = 2.0
        supernet.alphas_upsample[:, 1] = 1.0
    genotype = supernet.derive()
    assert all(cell.edges == ("dil_conv_3x3",) * 3 for cell in genotype.cells)
    assert all(cell.upsample == "bilinear" for cell in genotype.cells)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({}, "needs 'cells'"),
        ({"cells": [{"upsample": "cubic", "edges": ["skip"] * 3}] * 3}, "upsample 'cubic'"),
        ({"cells": [{"upsample": "nearest", "edges": ["skip"]}] * 3}, "must list 3"),
        ({"cells": [{"upsample": "nearest", "edges": ["conv_7x7"] * 3}] * 3}, "conv_7x7"),
    ],
)
def test_bad_genotypes_fail_in_one_line(bad, message):
    with pytest.raises(ValueError, match=message):
        GeneratorGenotype.from_dict(bad)


def test_zeroq_inputs_fit_the_bn_statistics(teacher):
    images, stats = fit_inputs(teacher, (16, 1, 32, 32), 30, lr=0.1)
    assert images.shape == (16, 1, 32, 32) and not images.requires_grad
    assert stats.last < 0.7 * stats.first


def test_reconstruction_loss_without_batch_norm_is_the_cross_entropy():
    logits, labels = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    ce = nn.functional.cross_entropy(logits, labels)
    assert torch.equal(reconstruction_loss(logits, labels, None), ce)
    assert float(reconstruction_loss(logits, labels, torch.tensor(2.0))) == pytest.approx(
        float(ce) + 0.2
    )


def test_sample_grid_puts_each_class_in_its_row():
    images = torch.zeros(6, 1, 4, 4)
    images[3:] = 10.0  # class 1: saturates to white
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    grid = sample_grid(images, labels, [0.5], [0.1], per_class=3, scale=1)
    assert grid.shape == (2 * 6 + 2, 3 * 6 + 2, 3)
    assert int(grid[2:6, 2:6].mean()) == 128  # class 0 at the mean: mid grey
    assert int(grid[8:12, 2:6].min()) == 255


# ---------------------------------------------------------------------------------- students


def test_unit_names_map_a_basic_block_onto_two_bireal_units():
    assert _unit_name("stages.1.0.conv1.weight") == "stages.1.0.conv.weight"
    assert _unit_name("stages.1.1.bn2.running_var") == "stages.1.3.bn.running_var"
    assert _unit_name("stages.2.0.shortcut.1.weight") == "stages.2.0.shortcut.1.weight"
    assert _unit_name("stem.0.weight") == "stem.0.weight"


def test_students_start_from_the_teacher(teacher):
    binary = make_student("bireal18", teacher)
    assert models.spec_of(binary)["name"] == "bireal18"
    assert torch.equal(binary.classifier.weight, teacher.classifier.weight)
    assert torch.equal(binary.stages[1][3].bn.weight, teacher.stages[1][1].bn2.weight)
    quantized = make_student("int4", teacher)
    spec = models.spec_of(quantized)
    assert spec["name"] == "quantized" and spec["args"]["weight_bits"] == 4
    assert torch.equal(quantized.classifier.weight, teacher.classifier.weight)
    with pytest.raises(ValueError, match="unknown student"):
        make_student("int16", teacher)


# ------------------------------------------------------------------------------------ the CLI


def _fail(*args, **kwargs):
    raise AssertionError("a data-free compression opened a dataset")


@pytest.fixture
def no_datasets(monkeypatch):
    """Every dataset loader of the toolkit (and scikit-learn's digits) made to fail."""
    import sklearn.datasets

    import toolkit.data
    import toolkit.train

    for module, name in [
        (toolkit.data, "load_dataset"),
        (toolkit.data, "_reader"),
        (toolkit.data, "_digits_raw"),
        (toolkit.data, "_load_digits"),
        (toolkit.train, "load_dataset"),
        (sklearn.datasets, "load_digits"),
    ]:
        monkeypatch.setattr(module, name, _fail)


def _compress(teacher_dir, out, *extra):
    return runner.invoke(
        app,
        [
            "compress",
            str(teacher_dir),
            "--out",
            str(out),
            "--generator-steps",
            "4",
            "--steps",
            "4",
            "--batch-size",
            "8",
            "--no-progress",
            "--json",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "to, generator",
    [("bireal18", "gdfq"), ("int8", "zeroq"), ("int4", "autorecon")],
)
def test_compress_never_opens_a_dataset(teacher_dir, tmp_path, no_datasets, to, generator):
    out = tmp_path / "student"
    result = _compress(
        teacher_dir, out, "--to", to, "--generator", generator, "--search-epochs", "1"
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["generator"] == generator and document["student"] == to
    assert 0.0 < document["teacher_accuracy"] <= 1.0
    assert document["files"]["samples"] == str(out / "samples.png")
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert checkpoint.is_checkpoint(out)
    if generator == "autorecon":
        genotype = GeneratorGenotype.from_dict(json.loads((out / "generator.json").read_text()))
        assert genotype.to_dict() == document["genotype"]
        assert (out / "alphas.png").is_file()


@pytest.mark.parametrize("to", ["bireal18", "int8", "int4"])
def test_the_student_evaluates_and_exports_with_parity(teacher_dir, tmp_path, to):
    out = tmp_path / "student"
    assert _compress(teacher_dir, out, "--to", to).exit_code == 0
    result = runner.invoke(app, ["eval", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads(result.stdout)["accuracy"] <= 1.0

    from exporters import runtime

    student = checkpoint.load(out).model
    test = load_dataset("digits", "test")
    x = test.x[:64].astype(np.float32)
    with torch.no_grad():
        expected = student(torch.from_numpy(x)).numpy()
    for fmt in ("onnx", "onnx-portable"):
        artifact = tmp_path / f"artifact-{fmt}"
        exported = runner.invoke(
            app, ["export", str(out), "--format", fmt, "--out", str(artifact), "--json"]
        )
        assert exported.exit_code == 0, exported.output
        got = runtime.load(artifact).predict(x)
        assert np.array_equal(got.argmax(1), expected.argmax(1))
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_bad_input_fails_in_one_line(teacher_dir, tmp_path):
    result = _compress(teacher_dir, tmp_path / "a", "--to", "int16")
    assert result.exit_code == 1 and "unknown student --to 'int16'" in result.output
    result = _compress(teacher_dir, tmp_path / "b", "--generator", "gan")
    assert result.exit_code == 1 and "unknown --generator 'gan'" in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("spec.json", "model.safetensors"):
        (broken / name).write_bytes((teacher_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a tensor file")
    result = _compress(broken, tmp_path / "c")
    assert result.exit_code == 1 and "cannot read the teacher" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_a_teacher_without_batch_norm(tmp_path):
    lenet = models.create("lenet5", num_classes=10, in_channels=1)
    teacher_dir = checkpoint.save(
        lenet, tmp_path / "lenet", channels=1, image_size=32, classes=list("0123456789")
    )
    result = _compress(teacher_dir, tmp_path / "z", "--generator", "zeroq")
    assert result.exit_code == 1
    assert "no batch-norm layers" in result.output and "--generator gdfq" in result.output
    result = _compress(teacher_dir, tmp_path / "g", "--generator", "gdfq", "--to", "int8")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["teacher_accuracy"] is None


def test_a_given_genotype_skips_the_search(teacher_dir, tmp_path):
    genotype = random_genotype(3)
    assert genotype == random_genotype(3) and genotype != random_genotype(4)
    assert all(op != "none" for cell in genotype.cells for op in cell.edges)
    path = tmp_path / "generator.json"
    path.write_text(genotype.to_json())
    out = tmp_path / "given"
    result = _compress(teacher_dir, out, "--generator", "autorecon", "--genotype", str(path))
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["genotype"] == genotype.to_dict()
    assert "search" not in document["seconds"] and not (out / "alphas.png").exists()
    assert GeneratorGenotype.from_dict(json.loads((out / "generator.json").read_text())) == genotype

    result = _compress(teacher_dir, tmp_path / "x", "--genotype", str(path))  # gdfq
    assert result.exit_code == 1 and "for --generator autorecon only" in result.output
    path.write_text('{"cells": []}')
    result = _compress(
        teacher_dir, tmp_path / "y", "--generator", "autorecon", "--genotype", str(path)
    )
    assert result.exit_code == 1 and "needs 'cells'" in result.output
    path.write_text("not json")
    result = _compress(
        teacher_dir, tmp_path / "z", "--generator", "autorecon", "--genotype", str(path)
    )
    assert result.exit_code == 1 and "is not a JSON genotype" in result.output
