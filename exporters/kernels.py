"""XNOR + popcount kernels of the fast runtime: the native library, called from numpy.

The kernels themselves are C (``exporters/csrc``, one build per instruction set, chosen at run
time; :mod:`exporters.native` loads them). This module keeps the Python side: it repacks a
layer's weights once, at model load, into the kernels' layout, and calls the kernels with numpy
arrays. Nothing here imports torch or numba, and nothing compiles at run time: the first call
is as fast as the others.

How a binary convolution runs, and why it is laid out this way:

1. The float NCHW input is binarized and packed in one pass, 64 channels per uint64 word,
   into an NHWC word tensor ``(N, Hp, Wp, Cin_words)`` whose spatial border is left at 0 bits.
   A 0 bit is +1, and bitfleet's binary convolutions pad with +1, so padding is free.
2. No im2col is materialized: every tap of the kernel reads its ``Cin_words`` words straight
   from the padded tensor at a fixed offset from the output pixel.
3. Weights are repacked once (:func:`prepare_conv_weight`) into blocks of ``_BLOCK`` = 64
   output channels, ``(blocks, taps * Cin_words, 64)`` uint64, word-aligned per tap (channel
   padding bits are 0 in both operands, so they never count). The inner loop broadcasts one
   input word against a block's 64 weight words: with AVX-512 that is 8 VPXORQ + VPOPCNTQ +
   VPADDQ, three output pixels sharing each weight load.
4. The epilogue is fused: ``out = multiplier[c] * (K - 2 * popcount) + bias[c] (+ residual)``,
   so the exporter folds batch norm and the Bi-Real shortcut into the call.

Threads: ``threads=N`` runs a call on N threads of the library's pool (its workers sleep
between calls, so they never steal cores from ONNX Runtime segments running in between);
None means one per available core.

Without the native library (an install without a C compiler) the same API runs a numpy
implementation: exact, several times slower, announced once in the log.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from . import native
from .conventions import Padding, conv_output_size, padding4
from .packing import packed_nbytes

__all__ = [
    "PreparedConv",
    "PreparedLinear",
    "prepare_conv_weight",
    "prepare_linear_weight",
    "binary_conv2d",
    "binary_linear",
    "pack_activations",
    "backend",
    "NUMPY_BACKEND",
]

_BLOCK = 64
"""Output channels per weight block (``BF_BLOCK`` in the C code)."""

NUMPY_BACKEND = "numpy"
"""What :func:`backend` reports when the native library is missing."""


@cache
def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _thread_count(threads: int | None) -> int:
    if threads is None:
        return _available_cores()
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return int(threads)


def backend() -> str:
    """The instruction set the kernels run, or ``numpy`` without the native library.

    One of ``avx512``, ``avx2``, ``neon_dotprod``, ``neon`` and ``scalar``.
    """
    lib = native.library()
    return lib.isa if lib is not None else NUMPY_BACKEND


def _pointer(array: np.ndarray) -> int:
    return array.ctypes.data


# --------------------------------------------------------------------------- Python API


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """Normalize an int or a pair to a pair of positive ints."""
    pair = tuple(int(v) for v in value) if isinstance(value, Iterable) else (int(value), int(value))
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def _channel_vector(values: np.ndarray | None, cout: int, default: float, name: str) -> np.ndarray:
    """A contiguous float32 vector of length ``cout`` (``default`` everywhere when None)."""
    if values is None:
        return np.full(cout, default, np.float32)
    vec = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if vec.shape[0] != cout:
        raise ValueError(f"{name} has {vec.shape[0]} values, expected {cout}")
    return vec


def pack_activations(
    x: np.ndarray,
    padding: int | Sequence[int] = 0,
    *,
    threads: int | None = None,
    isa: str | None = None,
) -> np.ndarray:
    """Binarize float NCHW ``x`` to the kernel's NHWC word tensor ``(N, Hp, Wp, Cin_words)``.

    Bit 1 iff x < 0; the spatial border of ``padding`` (an int, (h, w) or (left, right, top,
    bottom), see :func:`exporters.conventions.padding4`) and the channel padding bits of the
    last word are 0 (= +1). ``isa`` forces an instruction set (see :func:`backend`; ``numpy``
    runs the fallback), for tests and benchmarks.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] < 1:
        raise ValueError(f"activations must be NCHW with at least one channel, got {x.shape}")
    left, right, top, bottom = padding4(padding)
    n, channels, height, width = x.shape
    padded_h, padded_w = height + top + bottom, width + left + right
    cin_words = -(-channels // 64)
    lib = _library(isa)
    if lib is None:
        bits = np.zeros((n, height, width, cin_words * 64), np.uint8)
        bits[..., :channels] = (x < 0).transpose(0, 2, 3, 1)
        words = np.packbits(bits, axis=-1, bitorder="little").view("<u8").astype(np.uint64)
        out = np.zeros((n, padded_h, padded_w, cin_words), np.uint64)
        out[:, top : top + height, left : left + width] = words
        return out
    out = np.empty((n, padded_h, padded_w, cin_words), np.uint64)
    code = lib.pack(
        lib.isa_index,
        _thread_count(threads),
        _pointer(x),
        n,
        channels,
        height,
        width,
        top,
        left,
        padded_h,
        padded_w,
        _pointer(out),
    )
    lib.check(code, "packing")
    return out


def _library(isa: str | None) -> native.NativeLibrary | None:
    """The library running ``isa`` (None: the chosen one; ``numpy``: no library)."""
    if isa == NUMPY_BACKEND:
        return None
    lib = native.library()
    if isa is None or (lib is not None and isa == lib.isa):
        return lib
    if lib is None:
        raise native.NativeError(f"instruction set {isa!r} needs the native library, not built")
    return lib.with_isa(isa)


def _weight_blocks(words: np.ndarray) -> np.ndarray:
    """(Cout, k_words) uint64 -> (blocks, k_words, 64): output channels innermost, zero-padded."""
    cout, k_words = words.shape
    n_blocks = -(-cout // _BLOCK)
    padded = np.zeros((n_blocks * _BLOCK, k_words), np.uint64)
    padded[:cout] = words
    return np.ascontiguousarray(padded.reshape(n_blocks, _BLOCK, k_words).transpose(0, 2, 1))


def _tap_words(w_packed: np.ndarray, cout: int, cin: int, kh: int, kw: int) -> np.ndarray:
    """Repack flat (kh, kw, Cin) bits into word-aligned taps: (Cout, kh*kw*Cin_words) uint64."""
    w_packed = np.asarray(w_packed)
    expected = (cout, packed_nbytes(kh * kw * cin))
    if w_packed.dtype != np.uint8 or w_packed.shape != expected:
        raise ValueError(
            f"packed weight must be uint8 of shape {expected}, got {w_packed.dtype} "
            f"{w_packed.shape}"
        )
    bits = np.unpackbits(w_packed, axis=1, count=kh * kw * cin, bitorder="little")
    cin_words = -(-cin // 64)
    aligned = np.zeros((cout, kh, kw, cin_words * 64), np.uint8)
    aligned[..., :cin] = bits.reshape(cout, kh, kw, cin)
    packed = np.packbits(aligned, axis=-1, bitorder="little")
    return packed.view("<u8").astype(np.uint64).reshape(cout, kh * kw * cin_words)


@dataclass(frozen=True, eq=False)
class PreparedConv:
    """A binary convolution with weights in the kernel's layout, ready to be called.

    Built once per layer by :func:`prepare_conv_weight` (at model load); calling it runs
    binarize+pack of the input, the XNOR-popcount convolution and the fused epilogue in one
    native call. Equality is identity (the fields hold arrays).
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: Padding  # (left, right, top, bottom)
    dilation: tuple[int, int]
    multiplier: np.ndarray
    bias: np.ndarray
    w_blocks: np.ndarray = field(repr=False)
    _epilogue: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)
    _struct: native.BfConv = field(init=False, repr=False, compare=False)
    _signs: list[np.ndarray] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The kernel computes whole blocks of channels: pad multiplier/bias to match.
        n_blocks = self.w_blocks.shape[0]
        if self.w_blocks.dtype != np.uint64 or not self.w_blocks.flags.c_contiguous:
            raise ValueError("w_blocks must be a C-contiguous uint64 array")
        scale = np.zeros(n_blocks * _BLOCK, np.float32)
        shift = np.zeros(n_blocks * _BLOCK, np.float32)
        scale[: self.out_channels] = self.multiplier
        shift[: self.out_channels] = self.bias
        object.__setattr__(self, "_epilogue", (scale, shift))
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        left, right, top, bottom = self.padding
        struct = native.BfConv(
            self.in_channels,
            self.out_channels,
            kh,
            kw,
            sh,
            sw,
            dh,
            dw,
            top,
            bottom,
            left,
            right,
            -(-self.in_channels // 64),
            n_blocks,
            _pointer(self.w_blocks),
            _pointer(scale),
            _pointer(shift),
        )  # points into arrays this object holds, so they live as long as it
        object.__setattr__(self, "_struct", struct)

    def output_shape(self, n: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(N, Cout, Ho, Wo) for an (N, Cin, H, W) input."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        left, right, top, bottom = self.padding
        out_h = conv_output_size(height, kh, sh, (top, bottom), dh)
        out_w = conv_output_size(width, kw, sw, (left, right), dw)
        if out_h < 1 or out_w < 1:
            raise ValueError(f"input {height}x{width} is smaller than the dilated kernel")
        return (n, self.out_channels, out_h, out_w)

    def __call__(
        self,
        x: np.ndarray,
        residual: np.ndarray | None = None,
        *,
        threads: int | None = None,
        isa: str | None = None,
    ) -> np.ndarray:
        """Run the convolution on float32 NCHW ``x``.

        ``residual``, broadcastable to the output (N, Cout, Ho, Wo), is added in the epilogue.
        ``isa`` forces an instruction set (tests, benchmarks; see :func:`backend`).
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (N, {self.in_channels}, H, W) input, got {x.shape}")
        n, _, height, width = x.shape
        out_shape = self.output_shape(n, height, width)
        res = None
        if residual is not None:
            res = np.ascontiguousarray(residual, dtype=np.float32)
            if res.shape != out_shape:  # broadcast as ONNX Add would (a copy)
                res = np.ascontiguousarray(np.broadcast_to(res, out_shape))
        lib = _library(isa)
        if lib is None:
            return self._numpy_call(x, res, out_shape)
        out = np.empty(out_shape, np.float32)
        code = lib.conv2d(
            ctypes.byref(self._struct),
            lib.isa_index,
            _thread_count(threads),
            _pointer(x),
            n,
            height,
            width,
            None if res is None else _pointer(res),
            _pointer(out),
        )
        lib.check(code, "binary convolution")
        return out

    def _weight_signs(self) -> np.ndarray:
        """+-1 float weights (Cout, kh*kw*Cin), unpacked once for the numpy fallback."""
        if not self._signs:
            n_blocks, k_words, _ = self.w_blocks.shape
            words = self.w_blocks.transpose(0, 2, 1).reshape(n_blocks * _BLOCK, k_words)
            taps = self.kernel_size[0] * self.kernel_size[1]
            raw = np.ascontiguousarray(words[: self.out_channels]).view(np.uint8)
            bits = np.unpackbits(raw, axis=1, bitorder="little").reshape(
                self.out_channels, taps, -1
            )
            signs = 1.0 - 2.0 * bits[:, :, : self.in_channels].astype(np.float32)
            self._signs.append(signs.reshape(self.out_channels, -1))
        return self._signs[0]

    def _numpy_call(
        self, x: np.ndarray, residual: np.ndarray | None, out_shape: tuple[int, int, int, int]
    ) -> np.ndarray:
        """The same convolution in numpy: +-1 im2col times +-1 weights (exact below 2^24)."""
        n, _, out_h, out_w = out_shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        left, right, top, bottom = self.padding
        signs = np.where(x < 0, np.float32(-1), np.float32(1))
        padded = np.pad(signs, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=1)
        taps = [
            padded[
                :,
                :,
                ky * dh : ky * dh + sh * (out_h - 1) + 1 : sh,
                kx * dw : kx * dw + sw * (out_w - 1) + 1 : sw,
            ]
            for ky in range(kh)
            for kx in range(kw)
        ]
        cols = np.stack(taps, axis=1).transpose(0, 3, 4, 1, 2).reshape(n * out_h * out_w, -1)
        dots = cols @ self._weight_signs().T
        out = dots * self.multiplier + self.bias
        out = np.ascontiguousarray(out.reshape(n, out_h, out_w, -1).transpose(0, 3, 1, 2))
        if residual is not None:
            out = out + residual
        return out.astype(np.float32, copy=False)


def prepare_conv_weight(
    w_packed: np.ndarray,
    *,
    in_channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    multiplier: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> PreparedConv:
    """Repack ``pack_conv_weight`` output (Cout, nbytes) uint8 into a :class:`PreparedConv`.

    ``padding`` is an int, (h, w) or (left, right, top, bottom), the order of ``F.pad`` and of
    :func:`exporters.conventions.padding4`; padded taps count as +1.
    ``multiplier``/``bias`` (per output channel, default 1 and 0) form the fused epilogue.
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    cout = int(np.shape(w_packed)[0]) if np.ndim(w_packed) == 2 else 0
    if cout < 1 or int(in_channels) < 1:
        raise ValueError(
            f"need a (Cout >= 1, nbytes) packed weight and in_channels >= 1, got shape "
            f"{np.shape(w_packed)} and in_channels={in_channels}"
        )
    words = _tap_words(w_packed, cout, int(in_channels), kh, kw)
    return PreparedConv(
        in_channels=int(in_channels),
        out_channels=cout,
        kernel_size=(kh, kw),
        stride=_pair(stride, "stride"),
        padding=padding4(padding),
        dilation=_pair(dilation, "dilation"),
        multiplier=_channel_vector(multiplier, cout, 1.0, "multiplier"),
        bias=_channel_vector(bias, cout, 0.0, "bias"),
        w_blocks=_weight_blocks(words),
    )


def binary_conv2d(
    x: np.ndarray,
    weight: np.ndarray | PreparedConv,
    *,
    in_channels: int | None = None,
    kernel_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] | None = None,
    dilation: int | Sequence[int] | None = None,
    multiplier: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    residual: np.ndarray | None = None,
    threads: int | None = None,
    isa: str | None = None,
) -> np.ndarray:
    """Binary conv of float32 NCHW ``x``: ``multiplier * (sign(x) * sign(w)) + bias (+ residual)``.

    ``weight`` is either a :class:`PreparedConv` (the fast path: the geometry, multiplier and
    bias arguments must then be left out) or the packed (Cout, nbytes) uint8 array of
    ``pack_conv_weight``, which is prepared on the fly (convenient, but it repacks the weights
    on every call); then stride, padding and dilation default to 1, 0 and 1, multiplier and
    bias to 1 and 0. See :func:`prepare_conv_weight` for the argument forms.
    """
    if isinstance(weight, PreparedConv):
        given = (in_channels, kernel_size, stride, padding, dilation, multiplier, bias)
        if any(arg is not None for arg in given):
            raise TypeError("a PreparedConv carries its own geometry, multiplier and bias")
        return weight(x, residual, threads=threads, isa=isa)
    if in_channels is None or kernel_size is None:
        raise TypeError("in_channels and kernel_size are required with packed weights")
    prepared = prepare_conv_weight(
        weight,
        in_channels=in_channels,
        kernel_size=kernel_size,
        stride=1 if stride is None else stride,
        padding=0 if padding is None else padding,
        dilation=1 if dilation is None else dilation,
        multiplier=multiplier,
        bias=bias,
    )
    return prepared(x, residual, threads=threads, isa=isa)


@dataclass(frozen=True, eq=False)
class PreparedLinear:
    """A binary dense layer in the kernel's layout: a 1x1 convolution over a 1x1 map."""

    conv: PreparedConv

    @property
    def in_features(self) -> int:
        return self.conv.in_channels

    @property
    def out_features(self) -> int:
        return self.conv.out_channels

    def __call__(
        self,
        x: np.ndarray,
        residual: np.ndarray | None = None,
        *,
        threads: int | None = None,
        isa: str | None = None,
    ) -> np.ndarray:
        """(N, in_features) float32 -> (N, out_features); ``residual`` broadcasts to the output."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected (N, {self.in_features}) input, got {x.shape}")
        n = x.shape[0]
        res = None
        if residual is not None:
            res = np.broadcast_to(np.asarray(residual, np.float32), (n, self.out_features))
            res = res.reshape(n, self.out_features, 1, 1)
        out = self.conv(x.reshape(n, x.shape[1], 1, 1), res, threads=threads, isa=isa)
        return out.reshape(n, self.out_features)


def prepare_linear_weight(
    w_packed: np.ndarray,
    *,
    in_features: int,
    multiplier: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> PreparedLinear:
    """Repack ``pack_linear_weight`` output (Cout, nbytes) uint8 into a :class:`PreparedLinear`."""
    conv = prepare_conv_weight(
        w_packed, in_channels=in_features, kernel_size=1, multiplier=multiplier, bias=bias
    )
    return PreparedLinear(conv)


def binary_linear(
    x: np.ndarray,
    weight: np.ndarray | PreparedLinear,
    *,
    in_features: int | None = None,
    multiplier: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    residual: np.ndarray | None = None,
    threads: int | None = None,
    isa: str | None = None,
) -> np.ndarray:
    """Binary dense layer on (N, K) float32: ``multiplier * (sign(x) @ sign(w).T) + bias``.

    ``weight`` is a :class:`PreparedLinear` (then leave the other arguments out) or the packed
    (Cout, nbytes) uint8 array of ``pack_linear_weight``.
    """
    if isinstance(weight, PreparedLinear):
        if in_features is not None or multiplier is not None or bias is not None:
            raise TypeError("a PreparedLinear carries its own size, multiplier and bias")
        return weight(x, residual, threads=threads, isa=isa)
    if in_features is None:
        raise TypeError("in_features is required with packed weights")
    prepared = prepare_linear_weight(
        weight, in_features=in_features, multiplier=multiplier, bias=bias
    )
    return prepared(x, residual, threads=threads, isa=isa)
