"""AW-convolution and squeeze-excitation: the layers, the ResNet builders, the op counter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models.attention import ATTENTIONS, AWConv2d, SqueezeExcitation, parse_attention
from models.layers import BinaryConv2d

BINARY = {"input_quantizer": "approx_sign", "kernel_quantizer": "magnitude_aware_sign"}
RESNETS = ["bireal18", "bireal34", "resnet18", "resnet34"]


def _randomize_attention(layer: AWConv2d, seed: int = 0, scale: float = 1.0) -> None:
    """Give ``rows`` (zero at init) random values, so A(x) is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.rows.weight.copy_(torch.randn(layer.rows.weight.shape, generator=g) * scale)
        layer.rows.bias.copy_(torch.randn(layer.rows.bias.shape, generator=g) * scale / 3)


def _twin(aw: AWConv2d, plain: nn.Conv2d) -> None:
    with torch.no_grad():
        plain.weight.copy_(aw.weight)
        if plain.bias is not None and aw.bias is not None:
            plain.bias.copy_(aw.bias)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0), (1, "same")])
def test_zero_attention_equals_the_plain_float_conv(stride, padding):
    torch.manual_seed(0)
    aw = AWConv2d(6, 10, 3, stride, padding)
    plain = nn.Conv2d(6, 10, 3, stride, padding)
    _twin(aw, plain)
    x = torch.randn(5, 6, 9, 9)
    assert torch.equal(aw.attention(x), torch.zeros(5, 10, 6, 3, 3))  # A starts at zero
    torch.testing.assert_close(aw(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_zero_attention_equals_the_plain_binary_conv(stride):
    torch.manual_seed(0)
    aw = AWConv2d(6, 10, 3, stride, 1, bias=False, **BINARY)
    plain = BinaryConv2d(6, 10, 3, stride, 1, bias=False, **BINARY)
    _twin(aw, plain)
    x = torch.randn(5, 6, 8, 8)
    assert aw.is_binary  # binary input and latent weight: clipped and gossiped as one
    torch.testing.assert_close(aw(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantizers", [{}, BINARY], ids=["float", "binary"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("factored_below", [0, 10**9], ids=["grouped", "factored"])
def test_batched_equals_a_per_sample_loop(quantizers, stride, factored_below):
    torch.manual_seed(1)
    layer = AWConv2d(4, 6, 3, stride, 1, **quantizers)
    layer.factored_below = factored_below  # every call through one of the two exact forms
    _randomize_attention(layer)
    x = torch.randn(5, 4, 7, 7)
    batched = layer(x)
    attention = layer.attention(x)
    assert attention.abs().amax() > 0.1  # the attention really differs between samples
    assert (attention[0] - attention[1]).abs().amax() > 1e-3
    weight = layer.quantized_weight()
    for i in range(len(x)):
        # the definition, sample by sample: conv(x, A(x) * W + W)
        xi = x[i : i + 1]
        if quantizers:
            xi = F.pad(layer.input_quantizer(xi), layer.one_padding, value=1.0)
        else:
            xi = F.pad(xi, layer.one_padding)
        expected = F.conv2d(xi, attention[i] * weight + weight, layer.bias, stride)
        torch.testing.assert_close(batched[i : i + 1], expected, rtol=1e-5, atol=1e-5)
        # and a batch of one runs the same
        torch.testing.assert_close(layer(x[i : i + 1]), expected, rtol=1e-5, atol=1e-5)


def test_attention_is_weight_shaped_and_not_a_separable_product():
    torch.manual_seed(2)
    layer = AWConv2d(4, 6, 3, padding=1)
    _randomize_attention(layer)
    a = layer.attention(torch.randn(3, 4, 5, 5))
    assert a.shape == (3, *layer.weight.shape)
    # a channel map times a spatial map would be rank 1 as (Cout*Cin) x (kh*kw); ours is not,
    # and as Cout x (Cin*kh*kw) it has the layer's rank (2)
    for sample in a:
        assert torch.linalg.matrix_rank(sample.reshape(6 * 4, 9)) > 1
        assert torch.linalg.matrix_rank(sample.reshape(6, 4 * 9)) == layer.rank


def test_gradients_reach_the_attention_parameters():
    torch.manual_seed(3)
    layer = AWConv2d(4, 6, 3, padding=1, **BINARY)
    x = torch.randn(3, 4, 6, 6)
    layer(x).square().sum().backward()
    # at init A = 0 = U V with U = 0: the gradient reaches U's layer, so training leaves zero
    assert layer.rows.weight.grad is not None and layer.rows.weight.grad.abs().sum() > 0
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    layer.zero_grad()
    _randomize_attention(layer)
    layer(x).square().sum().backward()
    for name in ("squeeze", "rows", "cols"):
        for param in getattr(layer, name).parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="groups=1"):
        AWConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="rank"):
        AWConv2d(4, 4, 3, rank=0)
    with pytest.raises(ValueError, match="reflect"):
        AWConv2d(4, 4, 3, padding_mode="reflect")


def test_squeeze_excitation_gates_each_channel():
    torch.manual_seed(4)
    se = SqueezeExcitation(32)
    x = torch.randn(2, 32, 5, 5)
    pooled = x.mean((2, 3), keepdim=True)
    gate = torch.sigmoid(se.expand(torch.relu(se.reduce(pooled))))
    torch.testing.assert_close(se(x), x * gate)
    assert se.reduce.out_channels == 4  # max(4, 32 // 16)


def test_parse_attention():
    assert [parse_attention(a) for a in ATTENTIONS] == [
        (False, False),
        (True, False),
        (False, True),
        (True, True),
    ]
    with pytest.raises(ValueError, match="'se\\+aw'"):
        parse_attention("cbam")


# --- op counting ------------------------------------------------------------------------------


def _attention_share(layer: nn.Module, shape: tuple[int, ...]) -> tuple[float, models.OpCount]:
    count = models.count_ops(nn.Sequential(layer), shape)
    conv = next(row for row in count.layers if row.name == "0")
    return (count.flops + count.bops - conv.macs) / conv.macs, count


def test_attention_costs_at_most_10_percent_at_a_representative_size():
    # 64 -> 64 channels on an 8x8 map: Bi-Real-18's third stage at 32x32 input (width 0.25),
    # or a width-1 net's 256 channels at the same map; (k + 1) / (H*W) = 3/64 plus small layers
    layer = AWConv2d(64, 64, 3, padding=1, bias=False, **BINARY)
    share, count = _attention_share(layer, (1, 64, 8, 8))
    assert 0.04 < share <= 0.10
    rows = {row.name: row for row in count.layers}
    assert set(rows) == {"0", "0.extra", "0.squeeze", "0.rows", "0.cols"}
    assert rows["0"].macs == 64 * 64 * 9 * 64  # the grouped conv costs what the plain one does
    assert rows["0.extra"].macs == 3 * 64 * 64 * 9  # U @ V (rank 2) and A * W + W
    assert rows["0.squeeze"].macs == 64 * 4 and rows["0.rows"].macs == 4 * 64 * 2
    assert rows["0.cols"].macs == 4 * 2 * 64 * 9
    # per-sample real weights: a binary AW layer's MACs are FLOPs, not BOPs
    assert count.bops == 0 and not rows["0"].binary


@pytest.mark.parametrize(
    "name,stem,size", [("resnet18", "cifar", 32), ("bireal18", "imagenet", 224)]
)
def test_whole_network_attention_cost(name, stem, size):
    plain = models.count_ops(models.create(name, stem=stem), (1, 3, size, size))
    aw = models.count_ops(models.create(name, stem=stem, attention="aw"), (1, 3, size, size))
    conv_macs = plain.flops + plain.bops
    extra = aw.flops + aw.bops - conv_macs
    assert 0 < extra <= 0.10 * conv_macs
    se = models.count_ops(models.create(name, stem=stem, attention="se"), (1, 3, size, size))
    assert 0 < se.flops - plain.flops < 0.01 * conv_macs  # SE's two small layers per block


def test_binary_aw_counts_as_flops():
    plain = models.count_ops(models.create("bireal18", width=0.25), (1, 3, 32, 32))
    aw = models.count_ops(models.create("bireal18", width=0.25, attention="aw"), (1, 3, 32, 32))
    assert plain.bops > 0 and aw.bops == 0
    extras = [row for row in aw.layers if row.kind == "extra"]
    assert len(extras) == 16  # one per binary 3x3 conv
    assert aw.flops > plain.flops + plain.bops  # every conv MAC plus the attention


# --- the builders -----------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", RESNETS)
def test_spec_round_trip(name, attention):
    torch.manual_seed(0)
    model = models.create(name, width=0.125, attention=attention).eval()
    spec = models.spec_of(model)
    assert spec["args"]["attention"] == attention
    rebuilt = models.build(models.load_spec(models.dump_spec(spec, "yaml"))).eval()
    assert models.spec_of(rebuilt) == spec
    rebuilt.load_state_dict(model.state_dict())  # the same architecture, name for name
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    aw = [m for m in model.modules() if isinstance(m, AWConv2d)]
    se = [m for m in model.modules() if isinstance(m, SqueezeExcitation)]
    convs3x3 = 32 if name.endswith("34") else 16
    units = convs3x3 if name.startswith("bireal") else convs3x3 // 2
    assert len(aw) == (convs3x3 if "aw" in attention else 0)
    assert len(se) == (units if "se" in attention else 0)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", ["sofar_rf", "sofar_drf"])
def test_sofar_takes_attention(name, attention):
    torch.manual_seed(0)
    kwargs = {"width": 0.125} if name == "sofar_rf" else {"width": 0.25, "growth": 8}
    model = models.create(name, attention=attention, **kwargs).eval()
    spec = models.spec_of(model)
    assert spec["args"]["attention"] == attention
    rebuilt = models.build(spec).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    convs = [m for m in model.modules() if isinstance(m, BinaryConv2d) and m.is_binary]
    aw = [m for m in convs if isinstance(m, AWConv2d)]
    assert len(aw) == (len(convs) if "aw" in attention else 0)
    assert any(isinstance(m, SqueezeExcitation) for m in model.modules()) == ("se" in attention)


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="unknown attention 'cbam'"):
        models.create("resnet18", attention="cbam")


def test_attention_trains_in_a_network():
    torch.manual_seed(5)
    model = models.create("bireal18", width=0.125, attention="se+aw")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    aw = next(m for m in model.modules() if isinstance(m, AWConv2d))
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        models.clip_latent_weights(model)
    # after a step U has left zero, so A(x) is no longer zero: the attention is being learned
    assert aw.rows.weight.abs().sum() > 0
    assert aw.attention(torch.randn(2, aw.in_channels, 4, 4)).abs().amax() > 0
    assert aw.weight.abs().amax() <= 1.0  # the latent weight is clipped like any binary one


# --- export -----------------------------------------------------------------------------------


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Random batch-norm statistics and a non-zero attention, so parity means something."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
        elif isinstance(module, AWConv2d):
            # small enough that 16 layers of (1 + A) keep a float net's logits finite
            _randomize_attention(module, seed, scale=0.05)


@pytest.fixture(scope="module")
def digits_test():
    from toolkit.data import load_dataset

    return load_dataset("digits", "test", channels=3).x


def _sign_ties(model: nn.Module, x: torch.Tensor, tie: float = 1e-6) -> torch.Tensor:
    """Per image: whether some activation a binary layer binarises lies within ``tie`` of 0.

    There float rounding (another summation order in ONNX Runtime) may flip a sign, and one
    flipped bit moves every later layer: such an image is a float tie, not a parity failure.
    """
    closest = torch.full((len(x),), float("inf"))
    hooks = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        nearest = inputs[0].detach().abs().flatten(1).amin(1)
        closest.copy_(torch.minimum(closest, nearest))

    for module in model.modules():
        if getattr(module, "input_quantizer", None) is not None:
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return closest < tie


@pytest.mark.parametrize("attention", ["aw", "se+aw"])
@pytest.mark.parametrize("name", ["bireal18", "resnet18"])
def test_export_parity_in_both_flavours(name, attention, digits_test, tmp_path):
    import numpy as np

    import exporters
    from exporters import runtime

    torch.manual_seed(0)
    model = models.create(name, width=0.125, attention=attention).eval()
    _randomize(model)
    x = torch.from_numpy(digits_test)
    with torch.no_grad():
        expected = model(x).numpy()
    scale = abs(expected).max()
    assert np.isfinite(scale)
    # images where no binarised activation is a float tie (all of them for the float ResNet)
    clear = ~_sign_ties(model, x).numpy()
    assert clear.mean() > 0.95
    for flavour in ("onnx-portable", "onnx"):
        path = exporters.export(model, tmp_path / flavour, flavour, input_shape=(3, 32, 32))
        got = runtime.load(path, threads=1).predict(digits_test)
        assert got.shape == expected.shape
        # test_export's tolerance
        assert abs(got - expected)[clear].max() <= 1e-4 * scale, flavour
        assert (got.argmax(1) == expected.argmax(1))[clear].all(), flavour


@pytest.mark.slow  # SoFAr RF has 60 AW convs: ~30-50 s to export and load on 2 cores
@pytest.mark.parametrize(
    "name,kwargs,attention",
    [
        ("sofar_rf", {"width": 0.125}, "aw"),
        ("sofar_drf", {"width": 0.25, "growth": 8}, "se+aw"),
    ],
)
def test_sofar_with_attention_exports_with_parity(name, kwargs, attention, digits_test, tmp_path):
    import exporters
    from exporters import runtime

    torch.manual_seed(0)
    model = models.create(name, attention=attention, **kwargs)
    for module in model.modules():
        if isinstance(module, AWConv2d):
            _randomize_attention(module, scale=0.05)
    images = digits_test[:128]
    x = torch.from_numpy(images)
    # batch-norm statistics of the data, as training leaves them: without them BinaryDenseNet's
    # activations grow layer by layer, and an attention computed from them with it
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
    scale = abs(expected).max()
    clear = ~_sign_ties(model, x).numpy()
    assert clear.mean() > 0.85  # SoFAr RF binarises 60 activations a pixel: more near-ties
    for flavour in ("onnx-portable", "onnx"):
        path = exporters.export(model, tmp_path / flavour, flavour, input_shape=(3, 32, 32))
        got = runtime.load(path, threads=1).predict(images)
        assert abs(got - expected)[clear].max() <= 1e-4 * scale, flavour
        assert (got.argmax(1) == expected.argmax(1))[clear].all(), flavour


def test_exported_aw_graph_is_standard_and_keeps_weights_packed():
    import numpy as np
    from onnx import numpy_helper

    from exporters.onnx_writer import to_onnx

    model = models.create("bireal18", width=0.125, attention="aw").eval()
    proto = to_onnx(model, (3, 32, 32), "onnx")
    ops = [n.op_type for n in proto.graph.node]
    # every binary 3x3 conv is an AW conv: no custom node, one im2col Conv and one per-sample
    # MatMul each (plus U @ V), group = Cin on the im2col Conv, never group = batch
    assert {n.domain for n in proto.graph.node} == {""}
    assert ops.count("MatMul") == 2 * 16
    im2col = [
        n
        for n in proto.graph.node
        if n.op_type == "Conv"
        and n.attribute
        and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]
    assert len(im2col) == 16
    packed = [
        numpy_helper.to_array(init)
        for init in proto.graph.initializer
        if init.data_type == 2  # uint8: the base weights, one bit per value
    ]
    assert sum(p.size for p in packed) * 8 >= sum(
        m.weight.numel() for m in model.modules() if isinstance(m, AWConv2d)
    )
    assert not any(
        np.array_equal(numpy_helper.to_array(init).shape, m.weight.shape)
        for init in proto.graph.initializer
        for m in model.modules()
        if isinstance(m, AWConv2d)
    )  # no float copy of a binary base weight


# --- command line -----------------------------------------------------------------------------


def test_train_and_bench_with_attention(tmp_path):
    import json

    from typer.testing import CliRunner

    from toolkit.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    args = ["train", "--model", "bireal18", "--stem", "imagenet", "--width", "0.125"]
    result = runner.invoke(
        app, [*args, "--attention", "aw", "--epochs", "1", "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "spec.json").read_text())
    assert spec["model"]["args"]["attention"] == "aw"
    result = runner.invoke(app, ["bench", str(out), "--repeats", "2", "--warmup", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["threads"]["1"]["onnx_ms"] > 0
    # bad input: one line, exit code 1, nothing written
    result = runner.invoke(app, [*args, "--attention", "cbam", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "unknown attention 'cbam'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "b" / "spec.json").exists()
    result = runner.invoke(app, ["train", "--model", "lenet5", "--attention", "aw"])
    assert result.exit_code == 1 and "attention" in result.output
    result = runner.invoke(app, ["bench", "lenet5", "--attention", "aw"])
    assert result.exit_code == 1 and "has no attention option" in result.output
    result = runner.invoke(app, ["bench", str(out), "--attention", "se"])
    assert result.exit_code == 1 and "already fixes its attention" in result.output


def test_speed_benchmark_runs(capsys):
    import json

    from benchmarks import attention_speed

    argv = ["--width", "0.125", "--batch", "2", "--steps", "1", "--warmup", "0", "--repeats", "1"]
    assert attention_speed.main([*argv, "--layers", "--attention", "none", "aw", "aw@grouped"]) == 0
    doc = json.loads(capsys.readouterr().out)
    steps = doc["training_step"]
    assert set(steps) == {"none", "aw", "aw@grouped"} and steps["none"]["ratio_to_none"] == 1.0
    assert steps["aw"]["step_ms_median"] > 0 and steps["aw@grouped"]["step_ms_median"] > 0
    assert list(doc["layers_forward_backward"]) == [
        "8ch_32x32",
        "16ch_16x16",
        "32ch_8x8",
        "64ch_4x4",
    ]


def test_attention_is_bounded_so_no_weight_flips_sign():
    torch.manual_seed(0)
    layer = AWConv2d(8, 6, 3, padding=1, **BINARY)
    _randomize_attention(layer, scale=50.0)  # factors deep in saturation
    x = 1000.0 * torch.randn(4, 8, 5, 5).abs()  # a large input mean, which once blew A up
    attention = layer.attention(x)
    assert attention.abs().amax() <= 1.0 + 1e-6
    assert attention.abs().amax() > 0.5  # the bound is reached, not the attention switched off
    weights = layer.sample_weights(x)
    base = layer.quantized_weight().unsqueeze(0)
    assert bool(((weights * base) >= 0).all())  # (1 + A) * W keeps W's sign
