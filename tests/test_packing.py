import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from exporters.packing import (
    pack_bits,
    pack_conv_weight,
    pack_linear_weight,
    packed_nbytes,
    unpack_bits,
    unpack_conv_weight,
    unpack_linear_weight,
)

finite = st.floats(-4.0, 4.0, allow_nan=False, width=32)


def sign(x):
    return np.where(np.asarray(x) < 0, -1.0, 1.0).astype(np.float32)


@given(st.integers(0, 1000))
def test_packed_nbytes_is_whole_words(length):
    nbytes = packed_nbytes(length)
    assert nbytes % 8 == 0
    assert nbytes * 8 >= length
    assert nbytes * 8 - length < 64


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=150),
        elements=finite,
    ),
    st.data(),
)
def test_roundtrip_is_sign(x, data):
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    length = x.shape[axis]
    packed = pack_bits(x, axis=axis)
    assert packed.dtype == np.uint8
    assert packed.shape[axis] == packed_nbytes(length)
    np.testing.assert_array_equal(unpack_bits(packed, length, axis=axis), sign(x))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_padding_bits_are_zero_and_words_view(length, seed):
    x = -np.ones(length, np.float32) * np.random.default_rng(seed).random(length)
    x -= 1.0  # all negative: every real bit is 1
    packed = pack_bits(x)
    words = packed.view("<u8")  # whole words: no copy, no error
    assert words.shape == (packed_nbytes(length) // 8,)
    bits = np.unpackbits(packed, bitorder="little")
    assert bits[:length].all()
    assert not bits[length:].any()


def test_bit_convention_by_hand():
    packed = pack_bits(np.array([-1.0, 1.0, 1.0, -1.0]))
    assert packed.tolist() == [0b1001, 0, 0, 0, 0, 0, 0, 0]
    # LSB-first across bytes and words: element 8 is bit 0 of byte 1, element 64 of word 1
    x = np.ones(65, np.float32)
    x[[0, 8, 63, 64]] = -2.0
    packed = pack_bits(x)
    assert packed.shape == (16,)
    assert packed[0] == 1 and packed[1] == 1 and packed[7] == 0x80 and packed[8] == 1
    assert packed.view("<u8").tolist() == [(1 << 63) | (1 << 8) | 1, 1]


def test_zero_and_negative_zero_are_plus_one():
    packed = pack_bits(np.array([-0.0, 0.0, -1e-30, 1e-30], np.float32))
    assert packed[0] == 0b0100
    np.testing.assert_array_equal(
        unpack_bits(packed, 4), np.array([1.0, 1.0, -1.0, 1.0], np.float32)
    )


def test_unpack_rejects_wrong_length_and_dtype():
    packed = pack_bits(np.ones(70))
    with pytest.raises(ValueError, match=r"16 packed bytes do not hold 200 bits \(expected 32\)"):
        unpack_bits(packed, 200)
    with pytest.raises(TypeError, match="packed bits must be uint8, got int16"):
        unpack_bits(packed.astype(np.int16), 70)


def test_conv_weight_order_is_kh_kw_cin_by_hand():
    # (Cout=1, Cin=2, kh=2, kw=2): flat order (ky, kx, c) -> bit ky*4 + kx*2 + c
    w = np.ones((1, 2, 2, 2), np.float32)
    w[0, 1, 0, 0] = -1.0  # ky=0 kx=0 c=1 -> bit 1
    w[0, 0, 0, 1] = -1.0  # ky=0 kx=1 c=0 -> bit 2
    w[0, 1, 1, 1] = -1.0  # ky=1 kx=1 c=1 -> bit 7
    packed = pack_conv_weight(w)
    assert packed.shape == (1, 8)
    assert packed[0, 0] == 0b10000110
    assert not packed[0, 1:].any()
    np.testing.assert_array_equal(unpack_conv_weight(packed, w.shape), w)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 70),
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(0, 2**32 - 1),
)
def test_conv_weight_roundtrip(cout, cin, kh, kw, seed):
    w = np.random.default_rng(seed).standard_normal((cout, cin, kh, kw)).astype(np.float32)
    packed = pack_conv_weight(w)
    assert packed.shape == (cout, packed_nbytes(cin * kh * kw))
    np.testing.assert_array_equal(unpack_conv_weight(packed, w.shape), sign(w))
    # identical to packing the (kh, kw, Cin)-ordered flattening directly
    flat = np.transpose(w, (0, 2, 3, 1)).reshape(cout, -1)
    np.testing.assert_array_equal(packed, pack_bits(flat))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 200), st.integers(0, 2**32 - 1))
def test_linear_weight_roundtrip(cout, cin, seed):
    w = np.random.default_rng(seed).standard_normal((cout, cin)).astype(np.float32)
    packed = pack_linear_weight(w)
    assert packed.shape == (cout, packed_nbytes(cin))
    np.testing.assert_array_equal(unpack_linear_weight(packed, w.shape), sign(w))


def test_packing_imports_no_torch():
    code = "import sys, exporters.packing; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
