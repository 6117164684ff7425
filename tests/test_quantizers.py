import math

import pytest
import torch

from models import quantizers

X = torch.linspace(-2.0, 2.0, 81, dtype=torch.float32)


def expected_grad(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "ste_sign":
        return (x.abs() <= 1.0).float()
    if name == "approx_sign":
        return (2.0 - 2.0 * x.abs()).clamp(min=0.0)
    if name == "swish_sign":
        b = 5.0
        return b * (2.0 - b * x * torch.tanh(b * x / 2.0)) / (1.0 + torch.cosh(b * x))
    raise AssertionError(name)


@pytest.mark.parametrize("name", quantizers.list_quantizers())
def test_forward_is_plus_minus_one_or_scaled(name):
    q = quantizers.get(name)
    if name == "magnitude_aware_sign":
        w = X.reshape(3, 27)  # three output channels
        out = q(w)
        scale = w.abs().mean(dim=1, keepdim=True).expand_as(w)
        assert torch.equal(out.abs(), scale)
        assert torch.equal(out.sign(), torch.where(w < 0, -1.0, 1.0))
    else:
        out = q(X.clone())
        assert set(out.unique().tolist()) == {-1.0, 1.0}
        assert torch.equal(out, torch.where(X < 0, -1.0, 1.0))
    # sign(0) = +1: bit 0 of the packed format
    assert float(q(torch.zeros(1))[0]) >= 0.0


@pytest.mark.parametrize("name", ["ste_sign", "approx_sign", "swish_sign"])
def test_gradient_matches_definition(name):
    x = X.clone().requires_grad_(True)
    quantizers.get(name)(x).sum().backward()
    assert torch.allclose(x.grad, expected_grad(name, X), atol=1e-5)


def test_swish_sign_gradient_is_derivative_of_its_surrogate():
    # d/dx [2 sigmoid(bx)(1 + bx(1 - sigmoid(bx))) - 1] by autograd equals the hand-written form
    b = 5.0
    x = X.clone().requires_grad_(True)
    s = torch.sigmoid(b * x)
    (2 * s * (1 + b * x * (1 - s)) - 1).sum().backward()
    assert torch.allclose(x.grad, expected_grad("swish_sign", X), atol=1e-4)


def test_magnitude_aware_sign_scales_per_output_channel_and_grad():
    w = torch.tensor([[0.5, -0.25, 2.0], [-0.1, 0.1, 0.4]], requires_grad=True)
    out = quantizers.magnitude_aware_sign(w)
    scales = w.detach().abs().mean(dim=1, keepdim=True)
    assert torch.allclose(out, scales * torch.where(w < 0, -1.0, 1.0))
    out.sum().backward()
    assert torch.allclose(w.grad, scales * (w.detach().abs() <= 1.0).float())


def test_ste_sign_clip_value():
    x = torch.tensor([-1.5, -0.5, 0.5, 1.5], requires_grad=True)
    quantizers.ste_sign(x, clip_value=1.5).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("name", quantizers.list_quantizers())
def test_config_round_trips(name):
    q = quantizers.get(name)
    config = q.get_config()
    assert config["name"] == name
    again = quantizers.get(config)
    assert type(again) is type(q) and again.get_config() == config
    assert quantizers.serialize(q) == name


def test_non_default_config_serializes_as_dict():
    q = quantizers.get({"name": "swish_sign", "beta": 10.0})
    assert quantizers.serialize(q) == {"name": "swish_sign", "beta": 10.0}
    x = torch.tensor([0.05], requires_grad=True)
    q(x).sum().backward()
    bx = 10.0 * 0.05
    assert math.isclose(
        float(x.grad), 10.0 * (2 - bx * math.tanh(bx / 2)) / (1 + math.cosh(bx)), rel_tol=1e-5
    )


def test_get_none_and_callable():
    assert quantizers.get(None) is None
    q = quantizers.get(torch.sign)
    assert torch.equal(q(torch.tensor([-2.0, 3.0])), torch.tensor([-1.0, 1.0]))


def test_unknown_name_lists_valid_ones():
    with pytest.raises(
        quantizers.UnknownQuantizerError, match="Did you mean 'ste_sign'.*approx_sign"
    ):
        quantizers.get("ste_sgn")
    with pytest.raises(ValueError, match="has no 'name'"):
        quantizers.get({"beta": 1.0})
    with pytest.raises(ValueError, match="bad arguments for quantizer 'approx_sign'"):
        quantizers.get({"name": "approx_sign", "beta": 1.0})
    with pytest.raises(ValueError, match="cannot make a quantizer from int"):
        quantizers.get(3)


@pytest.mark.parametrize("name", quantizers.list_quantizers())
def test_declared_export_interface(name):
    """Every built-in quantizer declares itself binary and factorizes into +-1 and a scale."""
    q = quantizers.get(name)
    assert q.binary is True
    w = X.reshape(3, 27)
    values, scale = q.factorize(w)
    assert torch.equal(values, quantizers.sign(w))
    assert (scale is not None) == q.per_channel_scale
    rebuilt = values if scale is None else values * scale.view(-1, 1)
    assert torch.equal(rebuilt, q(w))


def test_sign_is_plus_one_at_zero():
    x = torch.tensor([-3.0, -0.0, 0.0, 1e-30, 2.0])
    assert quantizers.sign(x).tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]


def test_register_by_name_and_unregister():
    class HalfSign(quantizers.Quantizer):
        name = "test_half_sign"

        def forward(self, x):
            return 0.5 * quantizers.sign(x)

    assert HalfSign.binary is False  # not binary unless declared
    assert quantizers.register(HalfSign) is HalfSign
    try:
        assert "test_half_sign" in quantizers.list_quantizers()
        q = quantizers.get("test_half_sign")
        assert isinstance(q, HalfSign) and quantizers.serialize(q) == "test_half_sign"
        quantizers.register(HalfSign)  # registering the same class again is harmless
        other = type("Other", (quantizers.Quantizer,), {"name": "test_half_sign"})
        with pytest.raises(ValueError, match="already registered"):
            quantizers.register(other)
    finally:
        quantizers.unregister("test_half_sign")
    assert "test_half_sign" not in quantizers.list_quantizers()
    with pytest.raises(
        quantizers.UnknownQuantizerError, match="unknown quantizer 'test_half_sign'"
    ):
        quantizers.get("test_half_sign")
    with pytest.raises(TypeError, match="Quantizer subclasses"):
        quantizers.register(torch.nn.Identity)
    with pytest.raises(ValueError, match="non-empty `name`"):
        quantizers.register(type("Nameless", (quantizers.Quantizer,), {}))
