"""Packed-bit format of binary weights and activations (numpy only, torch-free).

The convention is Larq Compute Engine's, so artifacts stay readable by the same mental model
(and tools) people already know:

- bit 1 means -1 (value < 0), bit 0 means +1 (value >= 0, which includes -0.0, +0.0 and NaN):
  :func:`exporters.conventions.sign_bit`, the one definition, which the kernels compile too;
- bits are packed LSB-first along one flattened dimension;
- the packed length is a whole number of 64-bit words, ``8 * ceil(K / 64)`` bytes, and the
  unused bits of the last word are 0 (= +1).

Whole words matter because the kernels XOR and popcount 64 bits at a time: a packed row can be
viewed as little-endian ``uint64`` without a copy, and padding bits are 0 in both operands, so
they never count in ``popcount(x ^ w)``.

Convolution weights (PyTorch layout ``(Cout, Cin, kh, kw)``) are flattened in ``(kh, kw, Cin)``
order, the order an NHWC kernel reads them (Cin innermost), before packing.
"""

from __future__ import annotations

import numpy as np

from .conventions import bit_value, sign_bit

__all__ = [
    "WORD_BITS",
    "packed_nbytes",
    "pack_bits",
    "unpack_bits",
    "pack_conv_weight",
    "unpack_conv_weight",
    "pack_linear_weight",
    "unpack_linear_weight",
]

WORD_BITS = 64
"""Packing granularity: rows are padded to whole 64-bit words."""


def packed_nbytes(length: int) -> int:
    """Bytes taken by ``length`` packed bits: a whole number of 64-bit words."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    return 8 * (-(-length // WORD_BITS))


def pack_bits(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pack the signs of ``values`` along ``axis`` into uint8 bytes (bit 1 iff value < 0).

    The result has the shape of ``values`` with ``axis`` replaced by
    ``packed_nbytes(values.shape[axis])``; it is C-contiguous when ``axis`` is the last one,
    so ``result.view("<u8")`` gives the 64-bit words without copying.
    """
    values = np.asarray(values)
    if values.ndim == 0:
        raise ValueError("pack_bits needs at least one dimension")
    moved = np.moveaxis(values, axis, -1)
    length = moved.shape[-1]
    nbits = 8 * packed_nbytes(length)
    bits = np.zeros(moved.shape[:-1] + (nbits,), dtype=np.uint8)
    bits[..., :length] = sign_bit(moved)  # -0.0, +0.0 and NaN pack as bit 0 (+1)
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(np.moveaxis(packed, -1, axis))


def unpack_bits(packed: np.ndarray, length: int, axis: int = -1) -> np.ndarray:
    """Inverse of :func:`pack_bits`: float32 +-1 values, ``length`` of them along ``axis``."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"packed bits must be uint8, got {packed.dtype}")
    if packed.ndim == 0:
        raise ValueError("unpack_bits needs at least one dimension")
    moved = np.moveaxis(packed, axis, -1)
    if moved.shape[-1] != packed_nbytes(length):
        raise ValueError(
            f"{moved.shape[-1]} packed bytes do not hold {length} bits "
            f"(expected {packed_nbytes(length)})"
        )
    bits = np.unpackbits(moved, axis=-1, count=length, bitorder="little")
    signs = bit_value(bits.astype(np.float32)).astype(np.float32, copy=False)
    return np.ascontiguousarray(np.moveaxis(signs, -1, axis))


def pack_conv_weight(weight: np.ndarray) -> np.ndarray:
    """Pack a ``(Cout, Cin, kh, kw)`` weight to ``(Cout, nbytes)`` uint8 in (kh, kw, Cin) order."""
    weight = np.asarray(weight)
    if weight.ndim != 4:
        raise ValueError(f"conv weight must be (Cout, Cin, kh, kw), got shape {weight.shape}")
    cout = weight.shape[0]
    flat = np.transpose(weight, (0, 2, 3, 1)).reshape(cout, -1)
    return pack_bits(flat, axis=-1)


def unpack_conv_weight(packed: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Inverse of :func:`pack_conv_weight`: ``(Cout, Cin, kh, kw)`` float32 +-1."""
    cout, cin, kh, kw = (int(s) for s in shape)
    if np.shape(packed)[0] != cout:
        raise ValueError(f"packed weight has {np.shape(packed)[0]} rows, shape says {cout}")
    flat = unpack_bits(packed, kh * kw * cin, axis=-1)
    return np.ascontiguousarray(np.transpose(flat.reshape(cout, kh, kw, cin), (0, 3, 1, 2)))


def pack_linear_weight(weight: np.ndarray) -> np.ndarray:
    """Pack a dense ``(Cout, Cin)`` weight to ``(Cout, nbytes)`` uint8 along Cin."""
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError(f"linear weight must be (Cout, Cin), got shape {weight.shape}")
    return pack_bits(weight, axis=-1)


def unpack_linear_weight(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`pack_linear_weight`: ``(Cout, Cin)`` float32 +-1."""
    cout, cin = (int(s) for s in shape)
    if np.shape(packed)[0] != cout:
        raise ValueError(f"packed weight has {np.shape(packed)[0]} rows, shape says {cout}")
    return unpack_bits(packed, cin, axis=-1)
