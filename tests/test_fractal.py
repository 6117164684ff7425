"""SoFAr fractal nets: expansion, drop-path, OPs matching, shapes, specs, export, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import exporters
import models
from exporters import runtime
from models.densenet import BinaryDenseConv
from models.fractal import (
    DRF_GROWTH,
    RF_WIDTH,
    DenseFractal,
    Fractal,
    draw_column,
    width_for_ops,
)
from models.resnet import BiRealUnit


class AddOne(nn.Module):
    """A stand-in conv whose output tells how many convs a path went through."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def forward(self, x):
        return x + 1


def _fractal(columns: int, drop_path: float = 0.0) -> Fractal:
    return Fractal(columns, (1,), AddOne, lambda s: (s, s), drop_path=drop_path)


def _randomize_batch_norm(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


# --------------------------------------------------------------------------- expansion


@pytest.mark.parametrize("columns", [1, 2, 3, 4, 5])
def test_expansion_has_c_columns_and_a_longest_path_of_2_to_the_c_minus_1(columns):
    block = _fractal(columns).eval()
    assert sum(isinstance(m, AddOne) for m in block.modules()) == 2**columns - 1
    x = torch.zeros(1, 1)
    # the last join averages one input per column
    assert len(block.branches(x, (True,) * columns)) == columns
    # column j alone is a chain of 2^(j-1) convs; the last column is the longest path
    for j in range(1, columns + 1):
        keep = tuple(i == j - 1 for i in range(columns))
        assert block(x, keep).item() == 2 ** (j - 1)


def test_joins_that_meet_are_one_mean():
    # f_3: columns give x+1, x+2.5 (= (x+1.5)+1), x+3.5: one 3-input mean, as FractalNet joins
    # (nested 2-input means would give x+2)
    assert _fractal(3).eval()(torch.zeros(1)).item() == pytest.approx(7 / 3)
    assert _fractal(2).eval()(torch.zeros(1)).item() == pytest.approx(1.5)


def test_residual_fractal_units_and_longest_path():
    model = models.create("sofar_rf", columns=4, width=0.125)
    units = [m for m in model.modules() if isinstance(m, BiRealUnit)]
    assert len(units) == 4 * (2**4 - 1)  # one c4 block per stage
    # 32 binary convs on the longest path + stem + 3 downsampling 1x1 + classifier: ResNet37
    counts = []
    hooks = [u.conv.register_forward_hook(lambda *a: counts.append(1)) for u in units]
    model.train()
    model.global_drop = 1.0
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        counts.clear()
        model(torch.zeros(2, 3, 32, 32))
        seen.add(len(counts))
    counts.clear()
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    assert len(counts) == 60  # eval runs every column
    for h in hooks:
        h.remove()
    # global drop-path: one column, the same in all four stages: 4 * 2^(j-1) convs
    assert seen <= {4, 8, 16, 32} and 32 in seen and len(seen) > 1


def test_columns_1_is_the_baseline():
    shape = (1, 3, 32, 32)
    pairs = (
        ("sofar_rf", "bireal18", {"width": 0.25}),
        ("sofar_drf", "binarydensenet28", {"width": 0.25, "growth": 64}),
    )
    for name, base, args in pairs:
        fractal = models.count_ops(models.create(name, columns=1, **args), shape)
        baseline = models.count_ops(models.create(base, **args), shape)
        assert (fractal.flops, fractal.bops, fractal.params) == (
            baseline.flops,
            baseline.bops,
            baseline.params,
        )


def test_dense_fractal_every_column_makes_the_same_channels():
    torch.manual_seed(0)
    block = DenseFractal(3, 8, 12, "ste_sign", "ste_sign").eval()
    x = torch.randn(2, 8, 6, 6)
    columns = block.fractal.branches(x, (True, True, True))
    assert [tuple(c.shape) for c in columns] == [(2, 12, 6, 6)] * 3
    assert block(x).shape == (2, 20, 6, 6)
    assert torch.equal(block(x)[:, :8], x)  # the concatenation shortcut keeps the input
    convs = [m.conv for m in block.modules() if isinstance(m, BinaryDenseConv)]
    # column 1: one conv of 12; column 2: two of 6; column 3: four of 3
    assert sorted(c.out_channels for c in convs) == [3, 3, 3, 3, 6, 6, 12]
    with pytest.raises(ValueError, match="not divisible"):
        DenseFractal(3, 8, 10, "ste_sign", "ste_sign")


def test_drf_layout():
    model = models.create("sofar_drf", columns=2, growth=8)
    blocks = [m for m in model.modules() if isinstance(m, DenseFractal)]
    assert len(blocks) == 12  # BinaryDenseNet-28's 6, 6, 6, 5 layers -> 3, 3, 3, 3 c2 blocks
    convs = [m for m in model.modules() if getattr(m, "is_binary", False)]
    assert len(convs) == 12 * 3


# --------------------------------------------------------------------------- drop-path


def test_local_drop_path_keeps_at_least_one_path():
    torch.manual_seed(0)
    block = _fractal(4, drop_path=1.0).train()  # every input would be dropped
    depths = {block(torch.zeros(1)).item() for _ in range(40)}
    # a single path survives each draw: its depth is a whole number of convs, >= 1
    assert all(d >= 1 and float(d).is_integer() for d in depths)
    assert len(depths) > 1  # and which one is random
    for _ in range(50):
        assert any(_fractal(3, drop_path=0.9).sample_keep())


def test_local_drop_path_drops_sometimes_and_keeps_all_sometimes():
    torch.manual_seed(1)
    block = _fractal(3, drop_path=0.3).train()
    values = {round(block(torch.zeros(1)).item(), 4) for _ in range(200)}
    assert round(7 / 3, 4) in values and len(values) > 3


def test_drop_path_is_off_in_eval():
    torch.manual_seed(0)
    block = _fractal(4, drop_path=1.0).eval()
    full = _fractal(4).eval()(torch.zeros(1))
    assert all(block(torch.zeros(1)) == full for _ in range(10))
    assert draw_column(4, 1.0, training=False) is None
    model = models.create("sofar_rf", width=0.125, drop_path=0.5, global_drop=1.0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_global_drop_path_picks_one_column():
    torch.manual_seed(0)
    draws = [draw_column(3, 1.0, training=True) for _ in range(60)]
    assert all(d is not None and sum(d) == 1 for d in draws)
    assert {d.index(True) for d in draws if d} == {0, 1, 2}
    assert draw_column(3, 0.0, training=True) is None


def test_bad_rates_and_columns():
    with pytest.raises(ValueError, match="drop_path must be a probability"):
        models.create("sofar_rf", drop_path=1.5)
    with pytest.raises(ValueError, match="global_drop must be a probability"):
        models.create("sofar_drf", global_drop=-0.1)
    with pytest.raises(ValueError, match="at least one column"):
        models.create("sofar_rf", columns=0)
    with pytest.raises(ValueError, match="keep needs 3 flags"):
        _fractal(3)(torch.zeros(1), (False, False, False))


# --------------------------------------------------------------------------- OPs


def test_width_for_ops_hits_its_target():
    shape = (1, 3, 32, 32)
    target = models.count_ops(models.create("sofar_rf", columns=3, width=20 / 64), shape).ops
    width = width_for_ops("sofar_rf", target, input_shape=shape, columns=3)
    got = models.count_ops(models.create("sofar_rf", columns=3, width=width), shape).ops
    assert abs(got - target) / target < 0.05
    assert width == 20 / 64
    target = models.count_ops(models.create("sofar_drf", growth=20, width=0.25), shape).ops
    growth = width_for_ops(
        "sofar_drf",
        target,
        param="growth",
        input_shape=shape,
        values=range(1, 40),
        width=0.25,
    )
    assert isinstance(growth, int)
    got = models.count_ops(models.create("sofar_drf", growth=growth, width=0.25), shape).ops
    assert got == target  # growth 20 or one that rounds to the same width


def test_width_for_ops_says_when_the_target_is_out_of_reach():
    with pytest.raises(
        ValueError, match=r"no width in \[0.015625, 0.125\] gives 1e\+12 OPs within 5%"
    ):
        width_for_ops(
            "sofar_rf",
            1e12,
            input_shape=(1, 3, 32, 32),
            values=[n / 64 for n in range(1, 9)],
        )


@pytest.fixture(scope="module")
def ops_224():
    shape = (1, 3, 224, 224)
    kw = {"stem": "imagenet", "num_classes": 1000}
    names = ("bireal18", "sofar_rf", "binarydensenet28", "sofar_drf")
    return {name: models.count_ops(models.create(name, **kw), shape) for name in names}


def test_defaults_match_their_baselines_in_ops_at_224(ops_224):
    rf, bireal = ops_224["sofar_rf"].ops, ops_224["bireal18"].ops
    drf, bdn = ops_224["sofar_drf"].ops, ops_224["binarydensenet28"].ops
    assert abs(rf - bireal) / bireal < 0.05
    assert abs(drf - bdn) / bdn < 0.05
    spec = models.spec_of(models.create("sofar_rf"))["args"]
    assert spec["columns"] == 4 and spec["width"] == RF_WIDTH == 44 / 64
    spec = models.spec_of(models.create("sofar_drf"))["args"]
    assert spec["columns"] == 2 and spec["growth"] == DRF_GROWTH == 54
    assert ops_224["sofar_rf"].bops > ops_224["bireal18"].bops  # more binary convs...
    assert ops_224["sofar_rf"].flops < ops_224["bireal18"].flops  # ...a narrower float stem


@pytest.mark.slow
def test_the_defaults_are_what_the_matcher_picks(ops_224):
    kw = {"stem": "imagenet", "num_classes": 1000}
    assert width_for_ops("sofar_rf", ops_224["bireal18"].ops, **kw) == RF_WIDTH
    target = ops_224["binarydensenet28"].ops
    assert width_for_ops("sofar_drf", target, param="growth", **kw) == DRF_GROWTH


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["sofar_rf", "sofar_drf"])
@pytest.mark.parametrize("stem,size", [("cifar", 32), ("imagenet", 64)])
@pytest.mark.parametrize("columns", [1, 3])
def test_forward_shapes(name, stem, size, columns):
    model = models.create(
        name, stem=stem, width=0.125, columns=columns, in_channels=1, num_classes=7
    )
    assert model(torch.randn(2, 1, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", ["sofar_rf", "sofar_drf"])
def test_training_step_with_drop_path(name):
    torch.manual_seed(0)
    model = models.create(name, width=0.125, columns=3, drop_path=0.15, global_drop=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = nn.functional.cross_entropy(
            model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "name,args",
    [("sofar_rf", {"width": 0.125, "columns": 3}), ("sofar_drf", {"width": 0.125, "growth": 48})],
)
def test_spec_round_trip_gives_the_same_outputs(name, args):
    torch.manual_seed(0)
    model = models.create(name, num_classes=5, **args).eval()
    _randomize_batch_norm(model)
    rebuilt = models.build(models.dump_spec(models.spec_of(model), "json"))
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert models.spec_of(rebuilt) == models.spec_of(model)


@pytest.mark.parametrize(
    "name,args",
    [
        ("sofar_rf", {"width": 0.125}),  # c4
        ("sofar_drf", {"width": 0.125}),  # c2
        ("sofar_drf", {"width": 0.125, "columns": 3, "stem": "imagenet"}),
    ],
)
@pytest.mark.parametrize("flavour", ["onnx", "onnx-portable"])
def test_export_parity(name, args, flavour, tmp_path):
    torch.manual_seed(1)
    model = models.create(name, num_classes=10, drop_path=0.5, global_drop=0.5, **args).eval()
    _randomize_batch_norm(model)
    x = np.random.default_rng(2).standard_normal((8, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    path = exporters.export(model, tmp_path / flavour, flavour, input_shape=(3, 32, 32))
    got = runtime.load(path, threads=1).predict(x)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale
    assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.slow
def test_bitfleet_train_sofar_rf_on_digits(tmp_path):
    from toolkit.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            "sofar_rf",
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--width",
            "0.125",
            "--stem",
            "imagenet",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model"] == "sofar_rf" and summary["epochs"] == 1
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    from models.checkpoint import load

    spec = load(out).spec
    assert spec["name"] == "sofar_rf" and spec["args"]["width"] == 0.125
    # the run directory exports as is
    artifact = exporters.export(out, tmp_path / "art", "onnx")
    channels = spec["args"]["in_channels"]
    image = np.zeros((1, channels, 32, 32), np.float32)
    assert runtime.load(artifact).predict(image).shape == (1, 10)
