import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_reference import reference_conv

from exporters import kernels, native
from exporters.conventions import sign
from exporters.packing import pack_bits, pack_conv_weight, pack_linear_weight

LIBRARY = native.library()
ISAS = [*(LIBRARY.supported if LIBRARY else ()), kernels.NUMPY_BACKEND]
"""Every instruction set this CPU runs, and the numpy fallback: each must give the same bits."""


# (batch, cin, cout, H, W, kernel, stride, padding, dilation); the first rows are wide enough
# (>= 8 output pixels, stride 1) for the AVX-512 pixels-in-lanes kernel, with partial vectors
CASES = [
    (1, 130, 70, 5, 57, 3, 1, 1, 1),
    (2, 64, 64, 4, 24, 3, 1, (1, 0, 1, 0), 1),
    (1, 65, 9, 3, 30, 3, 1, 2, 2),
    (1, 3, 5, 9, 7, 3, 1, 1, 1),
    (2, 5, 8, 8, 8, 3, 2, 1, 1),
    (1, 63, 17, 7, 9, 1, 1, 0, 1),
    (3, 65, 70, 6, 6, 3, 1, 2, 2),
    (1, 130, 64, 5, 6, 3, 2, 0, 1),
    (2, 64, 129, 6, 5, 5, 1, 2, 1),
    (1, 128, 3, 9, 9, 5, 2, 2, 2),
    (1, 7, 11, 12, 10, 7, 2, 3, 1),
    (1, 1, 1, 4, 4, 3, 1, (1, 0, 0, 1), 1),
    (2, 200, 33, 3, 3, 3, 1, 1, 1),
]


def make_case(batch, cin, cout, height, width, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cin, height, width)).astype(np.float32)
    w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    return x, w


def as4(padding):
    return (padding,) * 4 if np.isscalar(padding) else tuple(padding)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_exact_against_reference(case, isa):
    batch, cin, cout, height, width, k, stride, padding, dilation = case
    x, w = make_case(batch, cin, cout, height, width, k, seed=zlib.crc32(str(case).encode()))
    prepared = kernels.prepare_conv_weight(
        pack_conv_weight(w),
        in_channels=cin,
        kernel_size=k,
        stride=stride,
        padding=padding,
        dilation=dilation,
    )
    got = prepared(x, isa=isa)
    want = reference_conv(x, w, (stride,) * 2, as4(padding), (dilation,) * 2)
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # integers: exact


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    cin=st.integers(1, 140),
    cout=st.integers(1, 70),
    k=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.tuples(*[st.integers(0, 2)] * 4),
    extra=st.tuples(st.integers(0, 5), st.integers(0, 5)),
    seed=st.integers(0, 2**32 - 1),
    isa=st.sampled_from(ISAS),
)
def test_conv_random_geometry(batch, cin, cout, k, stride, dilation, padding, extra, seed, isa):
    span = dilation * (k - 1) + 1
    height = max(1, span - padding[2] - padding[3]) + extra[0]
    width = max(1, span - padding[0] - padding[1]) + extra[1]
    x, w = make_case(batch, cin, cout, height, width, k, seed)
    got = kernels.binary_conv2d(
        x,
        pack_conv_weight(w),
        in_channels=cin,
        kernel_size=k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        isa=isa,
    )
    want = reference_conv(x, w, (stride,) * 2, padding, (dilation,) * 2)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES[:6], ids=str)
def test_conv_epilogue_with_residual(case, isa):
    batch, cin, cout, height, width, k, stride, padding, dilation = case
    x, w = make_case(batch, cin, cout, height, width, k, seed=7)
    rng = np.random.default_rng(8)
    multiplier = rng.uniform(0.01, 2.0, cout).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    want_plain = reference_conv(
        x, w, (stride,) * 2, as4(padding), (dilation,) * 2, multiplier, bias
    )
    residual = rng.standard_normal(want_plain.shape).astype(np.float32)
    prepared = kernels.prepare_conv_weight(
        pack_conv_weight(w),
        in_channels=cin,
        kernel_size=k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        multiplier=multiplier,
        bias=bias,
    )
    got = prepared(x, residual, isa=isa)
    np.testing.assert_allclose(got, want_plain + residual, rtol=1e-5, atol=1e-4)
    # every set computes the same float operations in the same order: the same bits
    np.testing.assert_array_equal(got, prepared(x, residual, isa=ISAS[0]))


def test_residual_broadcasts_like_onnx_add():
    x, w = make_case(2, 5, 4, 6, 6, 3, seed=3)
    prepared = kernels.prepare_conv_weight(pack_conv_weight(w), in_channels=5, kernel_size=3)
    residual = np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1)
    np.testing.assert_array_equal(prepared(x, residual), prepared(x) + residual)


def test_zero_inputs_and_weights_are_plus_one():
    x = np.zeros((1, 3, 4, 4), np.float32)
    x[0, 0] = -0.0
    w = np.zeros((2, 3, 3, 3), np.float32)
    w[1] = -0.0
    out = kernels.binary_conv2d(x, pack_conv_weight(w), in_channels=3, kernel_size=3, padding=1)
    np.testing.assert_array_equal(out, np.full((1, 2, 4, 4), 27.0, np.float32))


@pytest.mark.parametrize("isa", ISAS)
def test_one_two_and_many_threads_identical(isa):
    x, w = make_case(2, 65, 130, 10, 9, 3, seed=11)
    prepared = kernels.prepare_conv_weight(
        pack_conv_weight(w),
        in_channels=65,
        kernel_size=3,
        padding=1,
        multiplier=np.linspace(0.1, 1.0, 130),
        bias=np.linspace(-1.0, 1.0, 130),
    )
    one = prepared(x, threads=1, isa=isa)
    np.testing.assert_array_equal(one, prepared(x, threads=2, isa=isa))
    np.testing.assert_array_equal(one, prepared(x, threads=7, isa=isa))  # more than units/cores
    np.testing.assert_array_equal(one, prepared(x, isa=isa))


def test_concurrent_calls_from_python_threads():
    """ctypes releases the GIL: calls from several threads share (or bypass) the pool safely."""
    from concurrent.futures import ThreadPoolExecutor

    x, w = make_case(1, 130, 70, 12, 12, 3, seed=12)
    prepared = kernels.prepare_conv_weight(pack_conv_weight(w), in_channels=130, kernel_size=3)
    want = reference_conv(x, w, (1, 1), (0, 0, 0, 0), (1, 1))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: prepared(x, threads=2), range(40)))
    for got in results:
        np.testing.assert_array_equal(got, want)


def test_threads_survive_fork():
    """A child forked after the pool started must start its own workers, not wait on ghosts."""
    code = (
        "import os, numpy as np\n"
        "from exporters import kernels\n"
        "from exporters.packing import pack_conv_weight\n"
        "w = np.random.default_rng(0).standard_normal((70, 65, 3, 3)).astype(np.float32)\n"
        "c = kernels.prepare_conv_weight(pack_conv_weight(w), in_channels=65, kernel_size=3)\n"
        "x = np.random.default_rng(1).standard_normal((1, 65, 9, 9)).astype(np.float32)\n"
        "want = c(x, threads=2)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if (c(x, threads=2) == want).all() else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("isa", ISAS)
def test_pack_activations_layout(isa):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 70, 3, 4)).astype(np.float32)
    x[0, 3, 1, 1], x[1, 69, 2, 3], x[0, 0, 0, 0] = -0.0, np.nan, -np.inf  # -0.0, NaN: bit 0
    words = kernels.pack_activations(x, padding=(2, 1, 1, 0), isa=isa)  # left, right, top, bottom
    assert words.shape == (2, 4, 7, 2) and words.dtype == np.uint64
    inner = words[:, 1:, 2:6, :]
    nhwc = np.transpose(x, (0, 2, 3, 1))
    np.testing.assert_array_equal(inner, pack_bits(nhwc).view("<u8"))
    border = words.copy()
    border[:, 1:, 2:6, :] = 0
    assert not border.any()  # spatial padding is +1 (bit 0)


@pytest.mark.parametrize("features", [1, 63, 64, 65, 300])
def test_linear_against_reference(features):
    rng = np.random.default_rng(features)
    x = rng.standard_normal((3, features)).astype(np.float32)
    w = rng.standard_normal((70, features)).astype(np.float32)
    dot = sign(x) @ sign(w).T
    got = kernels.binary_linear(x, pack_linear_weight(w), in_features=features)
    np.testing.assert_array_equal(got, dot)
    multiplier = rng.uniform(0.1, 1.0, 70).astype(np.float32)
    bias = rng.standard_normal(70).astype(np.float32)
    prepared = kernels.prepare_linear_weight(
        pack_linear_weight(w), in_features=features, multiplier=multiplier, bias=bias
    )
    np.testing.assert_allclose(
        kernels.binary_linear(x, prepared, threads=2),
        dot * multiplier + bias,
        rtol=1e-5,
        atol=1e-4,
    )
    residual = rng.standard_normal((3, 70)).astype(np.float32)
    np.testing.assert_allclose(
        prepared(x, residual), dot * multiplier + bias + residual, rtol=1e-5, atol=1e-4
    )


def test_argument_errors():
    x, w = make_case(1, 5, 4, 6, 6, 3, seed=1)
    packed = pack_conv_weight(w)
    prepared = kernels.prepare_conv_weight(packed, in_channels=5, kernel_size=3)
    with pytest.raises(TypeError, match="PreparedConv carries its own geometry"):
        kernels.binary_conv2d(x, prepared, in_channels=5)
    with pytest.raises(TypeError, match="in_channels and kernel_size are required"):
        kernels.binary_conv2d(x, packed)
    with pytest.raises(ValueError, match=r"packed weight must be uint8 of shape \(4, 40\)"):
        kernels.prepare_conv_weight(packed, in_channels=30, kernel_size=3)
    with pytest.raises(ValueError, match=r"expected \(N, 5, H, W\) input, got \(1, 4, 6, 6\)"):
        prepared(x[:, :4])
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        prepared(x[:, :, :2, :2])  # smaller than the kernel
    # the residual only has to broadcast to the output (documented): numpy's error says why
    with pytest.raises(ValueError, match="could not be broadcast"):
        prepared(x, np.zeros((1, 3, 4, 4), np.float32))  # residual of the wrong shape
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        prepared(x, threads=0)


def test_kernels_import_neither_torch_nor_numba():
    code = (
        "import sys, numpy as np, exporters.kernels as k\n"
        "c = k.prepare_conv_weight(np.zeros((3, 8), np.uint8), in_channels=5, kernel_size=1)\n"
        "c(np.ones((1, 5, 2, 2), np.float32))\n"
        "assert 'torch' not in sys.modules and 'numba' not in sys.modules, sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_native_library_is_built():
    """The kernels are a required part of an install with a compiler: their absence fails."""
    assert LIBRARY is not None, "exporters/_native*.so is missing: reinstall with gcc present"
    assert LIBRARY.compiled[0] == "scalar" and "scalar" in LIBRARY.supported
    # every set of this architecture compiled (a set the compiler rejects is left out quietly)
    config = json.loads((Path(kernels.__file__).parent / "csrc" / "isa.json").read_text())
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(os.uname().machine.lower())
    wanted = config["sets"].get(machine or os.uname().machine, {"scalar": None})
    assert set(LIBRARY.compiled) == set(wanted)


def _cpu_flags() -> set[str]:
    flags: set[str] = set()
    with open("/proc/cpuinfo") as info:
        for line in info:
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
    return flags


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_dispatcher_picks_the_best_set_this_cpu_has():
    flags, machine = _cpu_flags(), os.uname().machine
    if machine == "x86_64":
        avx512 = {"avx512f", "avx512vl", "avx512dq", "avx512bw", "avx512_vpopcntdq"}
        best = "avx512" if avx512 <= flags else "avx2" if "avx2" in flags else "scalar"
    elif machine == "aarch64":
        best = "neon_dotprod" if "asimddp" in flags else "neon"
    else:
        best = "scalar"
    assert kernels.backend() == best
    assert LIBRARY is not None and best in LIBRARY.supported


def test_forcing_an_unusable_set_says_what_is_usable():
    prepared = kernels.prepare_conv_weight(np.zeros((3, 8), np.uint8), in_channels=5, kernel_size=1)
    x = np.ones((1, 5, 2, 2), np.float32)
    missing = next(n for n in native.ISA_NAMES if LIBRARY is None or n not in LIBRARY.supported)
    with pytest.raises(native.NativeError, match=f"{missing}.*not usable here.*scalar"):
        prepared(x, isa=missing)
    env = {**os.environ, "BITFLEET_ISA": "vax"}
    code = "import exporters.kernels as k; k.backend()"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "BITFLEET_ISA=vax is not usable here" in run.stderr


def test_bitfleet_isa_selects_the_set():
    env = {**os.environ, "BITFLEET_ISA": "scalar"}
    code = "import exporters.kernels as k; print(k.backend())"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "scalar", run.stderr


def test_accepts_float64_and_non_contiguous_input():
    x, w = make_case(1, 9, 6, 7, 7, 3, seed=2)
    prepared = kernels.prepare_conv_weight(pack_conv_weight(w), in_channels=9, kernel_size=3)
    strided = np.asfortranarray(x.astype(np.float64))
    np.testing.assert_array_equal(prepared(strided), prepared(x))


def test_a_broken_library_setting_is_one_clear_error(tmp_path):
    code = "import exporters.kernels as k; k.backend()"
    for value, message in [
        (str(tmp_path / "none.so"), "BITFLEET_NATIVE_LIB=.*does not exist"),
        (__file__, "cannot load the native kernels"),  # not a shared library
    ]:
        env = {**os.environ, "BITFLEET_NATIVE_LIB": value}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert run.returncode != 0

        assert re.search(message, run.stderr.strip().splitlines()[-1]), run.stderr


def test_back_to_back_jobs_of_different_sizes_on_the_pool():
    """Workers that wake late must not claim units of a finished job with the next one's size."""
    rng = np.random.default_rng(13)
    layers = []
    for cin, cout, size, k, stride in [(64, 64, 28, 3, 1), (3, 5, 9, 3, 1), (130, 70, 12, 3, 2)]:
        x, w = make_case(2, cin, cout, size, size, k, seed=cin)
        conv = kernels.prepare_conv_weight(
            pack_conv_weight(w), in_channels=cin, kernel_size=k, stride=stride, padding=k // 2
        )
        layers.append((conv, x, conv(x, threads=1)))
    for _ in range(300):
        conv, x, want = layers[rng.integers(len(layers))]
        np.testing.assert_array_equal(conv(x, threads=int(rng.integers(2, 4))), want)
