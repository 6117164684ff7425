import warnings

import pytest
import torch
import torch.nn.functional as F

import models
from models.layers import BinaryConv2d, BinaryLinear


def test_float_when_no_quantizers_matches_nn_conv():
    torch.manual_seed(0)
    conv = BinaryConv2d(3, 4, 3, padding=1)
    ref = torch.nn.Conv2d(3, 4, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(conv(x), ref(x))
    assert not conv.is_binary


def test_binary_conv_equals_conv_of_signs_with_one_padding():
    torch.manual_seed(0)
    conv = BinaryConv2d(
        5,
        7,
        3,
        stride=2,
        padding=1,
        bias=False,
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
    )
    x = torch.randn(2, 5, 9, 9)
    sx = torch.where(x < 0, -1.0, 1.0)
    sw = torch.where(conv.weight < 0, -1.0, 1.0)
    expected = F.conv2d(F.pad(sx, (1, 1, 1, 1), value=1.0), sw, stride=2)
    assert torch.equal(conv(x), expected)
    assert conv.is_binary


@pytest.mark.parametrize("padding", [1, "same", (2, 1)])
def test_one_padding_border_equals_interior_on_all_ones_input(padding):
    torch.manual_seed(0)
    k = (5, 3) if padding == (2, 1) else 3
    conv = BinaryConv2d(
        4,
        3,
        k,
        padding=padding,
        bias=False,
        input_quantizer="approx_sign",
        kernel_quantizer="ste_sign",
    )
    out = conv(torch.ones(1, 4, 8, 8))
    # an all-+1 input padded with +1 is all +1 everywhere: every output position is the same
    assert out.shape[-2:] == (8, 8)
    assert torch.equal(out, out[:, :, 4:5, 4:5].expand_as(out))


def test_zero_padding_would_differ_at_the_border():
    # sanity check that the test above is meaningful: a float conv with zero padding differs
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 3, 3, padding=1, bias=False, kernel_quantizer="ste_sign")
    out = conv(torch.ones(1, 4, 8, 8))
    assert not torch.equal(out[:, :, 0, 0], out[:, :, 4, 4])


def test_padding_mode_other_than_zeros_rejected_with_binary_input():
    with pytest.raises(ValueError, match="padded with \\+1"):
        BinaryConv2d(2, 2, 3, padding=1, padding_mode="reflect", input_quantizer="ste_sign")


def test_binary_linear():
    torch.manual_seed(0)
    layer = BinaryLinear(6, 3, input_quantizer="ste_sign", kernel_quantizer="magnitude_aware_sign")
    x = torch.randn(4, 6)
    w = layer.weight
    expected = F.linear(
        torch.where(x < 0, -1.0, 1.0),
        w.abs().mean(1, keepdim=True) * torch.where(w < 0, -1.0, 1.0),
        layer.bias,
    )
    assert torch.allclose(layer(x), expected)


def test_warns_on_kernel_quantizer_without_clip():
    with pytest.warns(UserWarning, match="latent_clip"):
        BinaryConv2d(2, 2, 3, kernel_quantizer="ste_sign", latent_clip=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BinaryConv2d(2, 2, 3, kernel_quantizer="ste_sign")


def test_unknown_quantizer_name_in_layer():
    with pytest.raises(ValueError, match="unknown quantizer 'sign'"):
        BinaryLinear(2, 2, input_quantizer="sign")


def test_latent_weights_stay_clipped_during_training():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        BinaryConv2d(
            1, 8, 3, padding=1, input_quantizer="approx_sign", kernel_quantizer="ste_sign"
        ),
        torch.nn.Flatten(),
        BinaryLinear(8 * 4 * 4, 2, input_quantizer="ste_sign", kernel_quantizer="ste_sign"),
    )
    opt = torch.optim.SGD(net.parameters(), lr=5.0)  # huge steps push weights far out
    for _ in range(5):
        loss = net(torch.randn(8, 1, 4, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert models.clip_latent_weights(net) == 2
        for module in (net[0], net[2]):
            assert module.weight.abs().max() <= 1.0
