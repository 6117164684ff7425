"""The model registry: every registered model builds, runs, trains and round-trips its spec."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch import nn

import models

ALL_MODELS = models.list_models()


def small_args(name: str) -> dict:
    """Arguments that make any registered model cheap: narrow ResNets, 1-channel, 7 classes."""
    accepted = set(inspect.signature(models.model_entry(name).factory).parameters)
    args: dict = {}
    if "width" in accepted:
        args["width"] = 0.125
    if "in_channels" in accepted:
        args["in_channels"] = 1
    if "num_classes" in accepted:
        args["num_classes"] = 7
    return args


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_registry_has_the_documented_models():
    assert {"bireal18", "bireal34", "resnet18", "resnet34", "lenet5"} <= set(ALL_MODELS)
    assert ALL_MODELS == sorted(ALL_MODELS)
    assert all(models.is_model(n) for n in ALL_MODELS)
    assert not models.is_model("no_such_net")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shape_and_backward(name):
    torch.manual_seed(0)
    args = small_args(name)
    model = models.create(name, **args)
    channels = args.get("in_channels", 3)
    x = torch.randn(2, channels, 32, 32)
    out = model(x)
    assert out.shape == (2, args.get("num_classes", 10))
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert any(p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_build_of_spec_rebuilds_the_same_architecture(name):
    model = models.create(name, **small_args(name))
    spec = models.spec_of(model)
    assert spec["name"] == name
    assert spec["format"] == models.registry.SPEC_FORMAT
    # every argument of the factory is recorded, defaults included
    assert set(spec["args"]) == set(inspect.signature(models.model_entry(name).factory).parameters)
    rebuilt = models.build(spec)
    assert type(rebuilt) is type(model)
    assert state_shapes(rebuilt) == state_shapes(model)
    assert models.spec_of(rebuilt) == spec
    # spec_of hands out a copy: mutating it does not change the model's spec
    spec["args"]["num_classes"] = 99
    assert models.spec_of(model)["args"].get("num_classes") != 99


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("fmt,suffix", [("json", ".json"), ("yaml", ".yaml")])
def test_spec_round_trips_through_text_and_files(name, fmt, suffix, tmp_path):
    model = models.create(name, **small_args(name))
    spec = models.spec_of(model)
    text = models.dump_spec(spec, fmt)
    if fmt == "json":
        assert json.loads(text) == spec
    assert models.load_spec(text) == spec
    path = tmp_path / f"spec{suffix}"
    path.write_text(text)
    assert models.load_spec(path) == spec
    assert models.load_spec(str(path)) == spec
    rebuilt = models.build(path)
    assert models.spec_of(rebuilt) == spec
    assert state_shapes(rebuilt) == state_shapes(model)


def test_build_accepts_compact_json_text():
    spec = models.spec_of(models.create("bireal18", width=0.25))
    assert models.spec_of(models.build(json.dumps(spec))) == spec


def test_create_bireal18_imagenet_1000_classes():
    model = models.create("bireal18", stem="imagenet", num_classes=1000)
    spec = models.spec_of(model)
    assert spec["args"]["stem"] == "imagenet"
    assert spec["args"]["num_classes"] == 1000
    assert model.classifier.out_features == 1000
    assert isinstance(model.stem[0], nn.Conv2d) and model.stem[0].kernel_size == (7, 7)
    binary = [m for m in model.modules() if isinstance(m, models.BinaryConv2d)]
    assert len(binary) == 16 and all(m.is_binary for m in binary)
    # roughly 11.7M parameters, as ResNet-18 has
    assert 11e6 < sum(p.numel() for p in model.parameters()) < 12.5e6


def test_list_models_filters():
    assert models.list_models("bireal*") == ["bireal18", "bireal34"]
    assert models.list_models("*18") == ["bireal18", "resnet18"]
    assert models.list_models("nothing*") == []
    assert models.list_models(family="lenet") == ["lenet5"]
    assert set(models.list_models(family="resnet")) >= {"bireal18", "resnet34"}


def test_unknown_model_suggests_a_close_name():
    with pytest.raises(models.UnknownModelError, match=r"Did you mean 'bireal18'") as info:
        models.create("birael18")
    assert "bitfleet models" in str(info.value)
    with pytest.raises(models.UnknownModelError, match="unknown model 'zzz'"):
        models.build({"name": "zzz", "args": {}})


def test_bad_kwarg_lists_valid_arguments():
    with pytest.raises(models.SpecError, match="widht") as info:
        models.create("bireal18", widht=0.5)
    message = str(info.value)
    for arg in ("num_classes", "stem", "width", "in_channels", "input_quantizer"):
        assert arg in message


def test_spec_of_plain_module_is_an_error():
    with pytest.raises(models.SpecError, match=r"models\.create"):
        models.spec_of(nn.Linear(2, 2))
    # a family class built directly (not through the registry) has no spec either
    with pytest.raises(models.SpecError, match=r"ResNet was not built by models\.create\(\)"):
        models.spec_of(models.resnet.ResNet("bireal", (1, 1, 1, 1), width=0.125))


def test_callable_quantizer_cannot_go_in_a_spec():
    def my_sign(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, 1.0, -1.0)

    with pytest.raises(models.SpecError, match="cannot be stored in a model spec"):
        models.create("bireal18", width=0.125, input_quantizer=my_sign)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"format": "someone-else/9", "name": "lenet5", "args": {}}, "unknown spec format"),
        ({"name": 5, "args": {}}, "needs a string 'name' and a dict 'args'"),
        ({"name": "lenet5", "args": [1, 2]}, "needs a string 'name' and a dict 'args'"),
    ],
)
def test_malformed_specs_are_spec_errors(bad, match):
    with pytest.raises(models.SpecError, match=match):
        models.build(bad)


def test_load_spec_errors(tmp_path):
    with pytest.raises(models.SpecError, match="does not exist"):
        models.load_spec(tmp_path / "missing.yaml")
    with pytest.raises(models.SpecError, match="mapping"):
        models.load_spec("- a\n- list\n")
    with pytest.raises(models.SpecError, match="cannot parse"):
        models.load_spec("{name: [unclosed\n")
    with pytest.raises(ValueError, match="unknown spec format"):
        models.dump_spec({"name": "lenet5", "args": {}}, "toml")
