import pytest
import torch
import torch.nn.functional as F

from models.small_conv import dense_conv2d, use_dense_path


@pytest.mark.parametrize(
    "hw,kernel,stride,padding,dilation",
    [
        ((1, 1), 3, 1, (1, 1, 1, 1), 1),
        ((2, 2), 3, 1, (1, 1, 1, 1), 1),
        ((2, 2), 3, 2, (1, 1, 1, 1), 1),
        ((3, 3), 3, 1, (0, 0, 0, 0), 1),
        ((2, 3), (3, 5), 1, (2, 2, 1, 1), 1),
        ((1, 1), 3, 1, (2, 2, 2, 2), 2),
    ],
)
@pytest.mark.parametrize("pad_value", [0.0, 1.0])
def test_dense_conv_matches_conv_of_padded_input(hw, kernel, stride, padding, dilation, pad_value):
    torch.manual_seed(0)
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(3, 5, *hw, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, *k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    s = (stride, stride)
    d = (dilation, dilation)
    ref = F.conv2d(F.pad(x, padding, value=pad_value), w, b, s, 0, d)
    out = dense_conv2d(x, w, b, s, padding, d, pad_value=pad_value)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, w, b), g)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    for a, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, r)


def test_dense_path_is_exact_for_binary_values():
    torch.manual_seed(1)
    x = torch.randn(4, 64, 2, 2).sign()
    w = torch.randn(32, 64, 3, 3).sign()
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), value=1.0), w)
    assert torch.equal(dense_conv2d(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1.0), ref)


def test_dense_path_chosen_only_for_tiny_maps():
    assert use_dense_path(1, 1, (3, 3), 1)
    assert use_dense_path(2, 2, (3, 3), 1, (2, 2))
    assert not use_dense_path(3, 3, (3, 3), 1)  # corner outputs miss the far pixels
    assert not use_dense_path(4, 4, (3, 3), 1)
    assert not use_dense_path(1, 1, (3, 3), 2)


def test_dense_conv_refuses_geometry_with_structural_zeros():
    with pytest.raises(ValueError, match="whole input"):
        dense_conv2d(
            torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3), None, (1, 1), (1, 1, 1, 1), (1, 1)
        )
