"""XNOR + popcount kernels of the fast ONNX runtime (numpy + numba, torch-free).

Only the fast runtime imports this module: numba costs about 60 MB of resident memory, which a
device serving the portable flavour should not pay (docs/design.md, section 3).

How a binary convolution runs, and why it is laid out this way:

1. The float NCHW input is binarized and packed in one pass, 64 channels per uint64 word,
   straight from NCHW (each word gathers the sign bits of 64 channel planes, vectorized along
   the pixels), into an NHWC word tensor ``(N, Hp, Wp, Cin_words)`` whose spatial border is left
   at 0 bits. A 0 bit is +1, and bitfleet's binary convolutions pad with +1, so padding is free.
2. No im2col is materialized: every tap of the kernel reads its ``Cin_words`` words straight
   from the padded tensor at a fixed offset from the output pixel.
3. Weights are repacked once, at model load (:func:`prepare_conv_weight`), into blocks of
   ``_BLOCK`` = 64 output channels, ``(blocks, taps * Cin_words, 64)`` uint64, word-aligned per
   tap (channel padding bits are 0 in both operands, so they never count). The innermost loop
   broadcasts one input word against 64 output channels' weight words, which LLVM unrolls and
   vectorizes into VPXORQ + VPOPCNTQ + VPADDQ with the 64 accumulators (a stack array) held in
   registers.
4. The epilogue is fused: ``out = multiplier[c] * (K - 2 * popcount) + bias[c] (+ residual)``,
   so the exporter folds batch norm and the Bi-Real shortcut into the call.

Threads: ``threads=`` (or ``numba.set_num_threads``) sets how many threads the parallel loops
use. numba's OpenMP workers spin for a while after each call, and so do ONNX Runtime's
intra-op threads by default; on a 2-core device running both with more than one thread they
starve each other (a 0.2 ms conv took 30 ms in the benchmark), so such a runtime should set ORT's
``session.intra_op.allow_spinning`` to ``"0"``.

Environment set up before numba is imported (only where the user has not set it):

- ``NUMBA_CACHE_DIR`` = ``~/.cache/bitfleet/numba``, so ``cache=True`` works even when the
  package is installed read-only and the second process start loads kernels instead of
  compiling them.
- ``NUMBA_CPU_FEATURES`` = the host's features plus ``-prefer-256-bit`` on CPUs with
  AVX512-VPOPCNTDQ, so LLVM vectorizes with 512-bit registers (LLVM's default for Intel server
  cores is 256 bits; the popcount port then does half the work per instruction). Set
  ``BITFLEET_NUMBA_ZMM=0`` to keep LLVM's default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


def _configure_numba_environment() -> None:
    """Set numba's cache directory and vector width, unless the user chose them (see above)."""
    if "NUMBA_CACHE_DIR" not in os.environ:
        home = os.path.expanduser("~")
        base = home if home != "~" else os.path.join(os.sep, "tmp")
        os.environ["NUMBA_CACHE_DIR"] = os.path.join(base, ".cache", "bitfleet", "numba")
    if (
        "numba" in sys.modules
        or os.environ.get("BITFLEET_NUMBA_ZMM", "1") == "0"
        or "NUMBA_CPU_FEATURES" in os.environ
        or "NUMBA_CPU_NAME" in os.environ
    ):
        return
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features().flatten()
    except Exception:  # noqa: BLE001 - no feature string: keep numba's defaults
        return
    if "+avx512vpopcntdq" in features.split(","):
        os.environ["NUMBA_CPU_FEATURES"] = features + ",-prefer-256-bit"


_configure_numba_environment()

import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from .conventions import Padding, conv_output_size, padding4, sign_bit  # noqa: E402
from .packing import packed_nbytes  # noqa: E402

__all__ = [
    "PreparedConv",
    "PreparedLinear",
    "prepare_conv_weight",
    "prepare_linear_weight",
    "binary_conv2d",
    "binary_linear",
    "pack_activations",
]

_BLOCK = 64
"""Output channels per weight block: 8 zmm accumulators, and one block's weights stay in L1."""

_NO_RESIDUAL = np.zeros((1, 1, 1, 1), np.float32)
"""Stand-in residual when there is none, so the kernel compiles once for both cases."""

_ROW_CHUNK = 1024
"""Input pixels binarized per work unit of the packer: long vectors, yet enough units to split."""

_sign_bit = njit(inline="always")(sign_bit)
"""The packed format's sign bit (bit 1 iff x < 0), compiled into the packer's loops."""


# --------------------------------------------------------------------------- numba kernels


@intrinsic
def _popcount(typingctx, word):
    """LLVM's ctpop on a uint64 (as int64): the loop vectorizer turns it into VPOPCNTQ.

    ``np.bitwise_count`` goes through a ufunc loop and is several times slower in a kernel.
    """
    if word != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.int64(types.uint64), codegen


@intrinsic
def _stack_block(typingctx):
    """Pointer to a fresh ``_BLOCK``-long int64 array on the stack (for ``numba.carray``).

    A stack array provably aliases none of the kernel's input arrays, so LLVM keeps the popcount
    accumulators in registers across the tap loop. A heap array only gets that by luck of alias
    analysis: small edits elsewhere in the kernel made it spill them on every step, 1.5-2x slower.
    """
    signature = types.CPointer(types.int64)()

    def codegen(context, builder, sig, args):
        with builder.goto_entry_block():  # entry-block allocas are promoted; loops don't regrow
            block = builder.alloca(ir.ArrayType(ir.IntType(64), _BLOCK))
        return builder.bitcast(block, ir.IntType(64).as_pointer())

    return signature, codegen


@njit(cache=True, parallel=True)
def _pack_nchw(x, pad_top, pad_left, padded_h, padded_w, cin_words):  # pragma: no cover - jit
    """Binarize float NCHW ``x`` into a zero-bordered NHWC word tensor (bit 1 iff x < 0).

    Work units are (image, channel word, chunk of rows). Each ORs the sign bits of up to 64
    contiguous channel planes into a flat word buffer -- a long vectorizable loop even for 7x7
    maps, four planes per pass to cut the buffer's load/store traffic -- then scatters the words
    to their padded NHWC places.
    """
    n_img, channels, height, width = x.shape
    out = np.zeros((n_img, padded_h, padded_w, cin_words), np.uint64)
    rows = max(1, min(height, _ROW_CHUNK // max(width, 1)))
    n_chunks = (height + rows - 1) // rows
    planes = x.reshape(n_img, channels, height * width)
    zero = np.uint64(0)
    for unit in prange(n_img * cin_words * n_chunks):
        chunk = unit % n_chunks
        word = (unit // n_chunks) % cin_words
        img = unit // (n_chunks * cin_words)
        y0 = chunk * rows
        y1 = min(height, y0 + rows)
        p0 = y0 * width
        p1 = y1 * width
        acc = np.zeros(p1 - p0, np.uint64)
        c0 = word * 64
        n_bits = min(64, channels - c0)
        # Slices, not flat offsets: their indices are provably >= 0, so numba emits no
        # negative-index fix-ups and LLVM vectorizes the loops.
        for b in range(0, n_bits - 3, 4):
            s0 = planes[img, c0 + b, p0:p1]
            s1 = planes[img, c0 + b + 1, p0:p1]
            s2 = planes[img, c0 + b + 2, p0:p1]
            s3 = planes[img, c0 + b + 3, p0:p1]
            b0 = np.uint64(1) << np.uint64(b)
            b1 = b0 << np.uint64(1)
            b2 = b0 << np.uint64(2)
            b3 = b0 << np.uint64(3)
            for i in range(p1 - p0):
                acc[i] |= (
                    (b0 if _sign_bit(s0[i]) else zero) | (b1 if _sign_bit(s1[i]) else zero)
                ) | ((b2 if _sign_bit(s2[i]) else zero) | (b3 if _sign_bit(s3[i]) else zero))
        for b in range(n_bits - n_bits % 4, n_bits):
            src = planes[img, c0 + b, p0:p1]
            bit = np.uint64(1) << np.uint64(b)
            for i in range(p1 - p0):
                acc[i] |= bit if _sign_bit(src[i]) else zero
        for r in range(y1 - y0):
            for i in range(width):
                out[img, y0 + r + pad_top, pad_left + i, word] = acc[r * width + i]
    return out


@njit(cache=True, parallel=True)
def _xnor_conv(  # pragma: no cover - jit
    xp,
    w_blocks,
    tap_offsets,
    out_h,
    out_w,
    stride_h,
    stride_w,
    k_bits,
    multiplier,
    bias,
    residual,
    has_residual,
    out,
):
    """XNOR-popcount convolution over packed words with the fused affine/residual epilogue.

    Work units are (image, output row, block of 64 output channels); the block's weights
    (taps * Cin_words * 64 words) are reused from L1 by every pixel of the row. Per pixel, the
    64 popcount accumulators are a stack array that LLVM keeps in eight zmm registers while the
    taps' words stream past, then ``multiplier * (K - 2 * popcount) + bias`` is computed on
    them, vectorized over channels, into a pixel-major tile (``K - 2 * popcount`` is exact in
    integers, so multiplier 1 and bias 0 give exact results). The tile is finally transposed
    into the NCHW output row, adding the residual. ``multiplier``/``bias`` are padded to whole
    blocks.
    """
    n_img, padded_h, padded_w, cin_words = xp.shape
    xf = xp.reshape(-1)
    n_blocks = w_blocks.shape[0]
    n_taps = tap_offsets.shape[0]
    cout = out.shape[1]
    for unit in prange(n_img * out_h * n_blocks):
        blk = unit % n_blocks
        row = unit // n_blocks
        img = row // out_h
        yo = row % out_h
        co0 = blk * _BLOCK
        weights = w_blocks[blk]
        scale = multiplier[co0 : co0 + _BLOCK]
        shift = bias[co0 : co0 + _BLOCK]
        # numba's stub types a call of an @intrinsic like its typing function, typingctx
        # included; jitted code calls it without typingctx
        acc = numba.carray(_stack_block(), (_BLOCK,))  # type: ignore[call-arg]
        tile = np.empty((out_w, _BLOCK), np.float32)
        for xo in range(out_w):
            for j in range(_BLOCK):
                acc[j] = 0
            base = ((img * padded_h + yo * stride_h) * padded_w + xo * stride_w) * cin_words
            for t in range(n_taps):
                off = base + tap_offsets[t]
                for c in range(cin_words):
                    a = xf[off + c]
                    w_row = weights[t * cin_words + c]
                    for j in range(_BLOCK):
                        acc[j] += _popcount(a ^ w_row[j])
            for j in range(_BLOCK):
                tile[xo, j] = scale[j] * np.float32(k_bits - 2 * acc[j]) + shift[j]
        for j in range(min(_BLOCK, cout - co0)):
            co = co0 + j
            if has_residual:
                for xo in range(out_w):
                    out[img, co, yo, xo] = tile[xo, j] + residual[img, co, yo, xo]
            else:
                for xo in range(out_w):
                    out[img, co, yo, xo] = tile[xo, j]


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


class _Threads:
    """Context manager that runs numba's parallel loops on ``threads`` threads, then restores.

    ``None`` keeps numba's current setting. Requests above numba's pool size are clamped to it
    (``NUMBA_NUM_THREADS``, the core count by default) rather than failing on small devices.
    """

    def __init__(self, threads: int | None) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.previous: int | None = None

    def __enter__(self) -> None:
        if self.threads is None:
            return
        # numba.config sets its NUMBA_* attributes at import time, so no stub declares them
        wanted = min(self.threads, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        current = numba.get_num_threads()
        if wanted != current:
            numba.set_num_threads(wanted)
            self.previous = current

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            numba.set_num_threads(self.previous)


def pack_activations(
    x: np.ndarray, padding: int | Sequence[int] = 0, *, threads: int | None = None
) -> np.ndarray:
    """Binarize float NCHW ``x`` to the kernel's NHWC word tensor ``(N, Hp, Wp, Cin_words)``.

    Bit 1 iff x < 0; the spatial border of ``padding`` (an int, (h, w) or (left, right, top,
    bottom), see :func:`exporters.conventions.padding4`) and the channel padding bits of the
    last word are 0 (= +1).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"activations must be NCHW, got shape {x.shape}")
    left, right, top, bottom = padding4(padding)
    _, channels, height, width = x.shape
    with _Threads(threads):
        return _pack_nchw(
            x, top, left, height + top + bottom, width + left + right, -(-channels // 64)
        )


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
    binarize+pack of the input, the XNOR-popcount convolution and the fused epilogue. Equality
    is identity (the fields hold arrays).
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
    _plans: dict[tuple[int, int, int], _ConvPlan] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # The kernel computes whole blocks of channels: pad multiplier/bias to match.
        padded = self.w_blocks.shape[0] * _BLOCK
        scale = np.zeros(padded, np.float32)
        shift = np.zeros(padded, np.float32)
        scale[: self.out_channels] = self.multiplier
        shift[: self.out_channels] = self.bias
        object.__setattr__(self, "_epilogue", (scale, shift))

    def plan(self, n: int, height: int, width: int) -> _ConvPlan:
        """Geometry for an (N, Cin, H, W) input, computed once per input size and cached."""
        key = (n, height, width)
        plan = self._plans.get(key)
        if plan is None:
            plan = _ConvPlan.build(self, n, height, width)
            self._plans[key] = plan
        return plan

    def __call__(
        self, x: np.ndarray, residual: np.ndarray | None = None, *, threads: int | None = None
    ) -> np.ndarray:
        """Run the convolution on float32 NCHW ``x``.

        ``residual``, broadcastable to the output (N, Cout, Ho, Wo), is added in the epilogue.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (N, {self.in_channels}, H, W) input, got {x.shape}")
        plan = self.plan(x.shape[0], x.shape[2], x.shape[3])
        if residual is None:
            res, has_res = _NO_RESIDUAL, False
        else:
            res = np.ascontiguousarray(residual, dtype=np.float32)
            if res.shape != plan.out_shape:  # broadcast as ONNX Add would (a copy)
                res = np.ascontiguousarray(np.broadcast_to(res, plan.out_shape))
            has_res = True
        left, _, top, _ = self.padding
        (_, _, out_h, out_w), (sh, sw) = plan.out_shape, self.stride
        out = np.empty(plan.out_shape, np.float32)
        with _Threads(threads):
            xp = _pack_nchw(x, top, left, plan.padded_h, plan.padded_w, plan.cin_words)
            _xnor_conv(
                xp,
                self.w_blocks,
                plan.tap_offsets,
                out_h,
                out_w,
                sh,
                sw,
                plan.k_bits,
                *self._epilogue,
                res,
                has_res,
                out,
            )
        return out


@dataclass(frozen=True, eq=False)
class _ConvPlan:
    """Per-input-size geometry of a :class:`PreparedConv`, cached so calls do no Python math."""

    out_shape: tuple[int, int, int, int]
    padded_h: int
    padded_w: int
    cin_words: int
    k_bits: int
    tap_offsets: np.ndarray  # word offset of each (ky, kx) tap from its output pixel's origin

    @staticmethod
    def build(conv: PreparedConv, n: int, height: int, width: int) -> _ConvPlan:
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        left, right, top, bottom = conv.padding
        padded_h, padded_w = height + top + bottom, width + left + right
        out_h = conv_output_size(height, kh, sh, (top, bottom), dh)
        out_w = conv_output_size(width, kw, sw, (left, right), dw)
        if out_h < 1 or out_w < 1:
            raise ValueError(f"input {height}x{width} is smaller than the dilated kernel")
        cin_words = -(-conv.in_channels // 64)
        taps = [(ky * dh * padded_w + kx * dw) * cin_words for ky in range(kh) for kx in range(kw)]
        return _ConvPlan(
            out_shape=(n, conv.out_channels, out_h, out_w),
            padded_h=padded_h,
            padded_w=padded_w,
            cin_words=cin_words,
            k_bits=conv.in_channels * kh * kw,
            tap_offsets=np.array(taps, dtype=np.int64),
        )


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
        return weight(x, residual, threads=threads)
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
    return prepared(x, residual, threads=threads)


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
        self, x: np.ndarray, residual: np.ndarray | None = None, *, threads: int | None = None
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
        out = self.conv(x.reshape(n, x.shape[1], 1, 1), res, threads=threads)
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
) -> np.ndarray:
    """Binary dense layer on (N, K) float32: ``multiplier * (sign(x) @ sign(w).T) + bias``.

    ``weight`` is a :class:`PreparedLinear` (then leave the other arguments out) or the packed
    (Cout, nbytes) uint8 array of ``pack_linear_weight``.
    """
    if isinstance(weight, PreparedLinear):
        if in_features is not None or multiplier is not None or bias is not None:
            raise TypeError("a PreparedLinear carries its own size, multiplier and bias")
        return weight(x, residual, threads=threads)
    if in_features is None:
        raise TypeError("in_features is required with packed weights")
    prepared = prepare_linear_weight(
        weight, in_features=in_features, multiplier=multiplier, bias=bias
    )
    return prepared(x, residual, threads=threads)
