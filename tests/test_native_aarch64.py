"""The native kernels' ARM code paths, run on this x86 machine under qemu user-mode emulation.

The library's sources are cross-compiled with aarch64-linux-gnu-gcc into tests/native/
conv_driver.c (tests/native_build.py, the flags of exporters/csrc/isa.json), which runs under
``qemu-aarch64 -cpu max`` (an Armv8.2+ core with the dot-product extension, like the Pi 5's
Cortex-A76) and ``-cpu cortex-a72`` (the Raspberry Pi 4's core: NEON without dot product).
Every forced set (scalar, neon, neon_dotprod) must equal a float64 numpy reference of the
binary conv, pack exactly like exporters/packing.py, give the same bits on 1 and 2 threads;
the dispatcher must pick the best set the emulated CPU has and refuse the others. The same
cases run on the host through an x86-64 build of the driver (scalar, avx2, avx512), which also
proves the driver and its file format. Without the cross compiler or qemu the tests fail,
saying what to install: the ARM paths are part of what the suite guards.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from kernel_reference import reference_conv as shared_reference
from native_build import (
    Case,
    Driver,
    Result,
    ToolMissing,
    build_driver,
    output_size,
    read_results,
    require_tool,
    write_cases,
)

QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"
RUN_TIMEOUT = 30  # seconds; a deadlocked thread pool fails the test instead of hanging it

# (arch, emulated cpu or None for the host, forced set)
ARM_TARGETS = [
    ("aarch64", "max", "scalar"),
    ("aarch64", "max", "neon"),
    ("aarch64", "max", "neon_dotprod"),
    ("aarch64", "cortex-a72", "neon"),
]
HOST_TARGETS = [("x86_64", None, "scalar"), ("x86_64", None, "avx2"), ("x86_64", None, "avx512")]
TARGETS = ARM_TARGETS + HOST_TARGETS
TARGET_IDS = [f"{arch}-{cpu or 'host'}-{isa}" for arch, cpu, isa in TARGETS]

# (batch, cin, cout, (h, w), (kh, kw), (sh, sw), (left, right, top, bottom), (dh, dw),
#  residual, random multiplier and bias)
SHAPES = [
    (1, 1, 1, (5, 4), (3, 3), (1, 1), (1, 0, 0, 1), (1, 1), False, False),
    (2, 3, 17, (7, 6), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), True, True),
    (1, 63, 70, (6, 5), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), False, True),
    (3, 65, 129, (5, 5), (3, 3), (1, 1), (2, 1, 0, 2), (2, 2), True, True),
    (1, 130, 64, (6, 7), (5, 5), (2, 2), (2, 2, 1, 3), (1, 1), False, False),
    (2, 200, 17, (7, 8), (7, 7), (2, 1), (3, 3, 3, 2), (1, 2), True, True),
    # more pixels than one packing chunk (1024) and a row longer than one epilogue tile (64)
    (1, 3, 5, (33, 70), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), False, True),
    (2, 64, 1, (4, 9), (1, 5), (1, 2), (0, 3, 2, 0), (1, 1), True, False),
]


def random_shapes(count: int, seed: int) -> list[tuple]:
    """Shapes drawn from the values above (square or not), kept to a non-empty output."""
    rng = np.random.default_rng(seed)
    shapes: list[tuple] = []
    while len(shapes) < count:
        kernel = tuple(int(k) for k in rng.choice([1, 3, 5, 7], 2))
        stride = tuple(int(v) for v in rng.choice([1, 2], 2))
        dilation = tuple(int(v) for v in rng.choice([1, 2], 2))
        padding = tuple(int(v) for v in rng.integers(0, 4, 4))
        hw = tuple(int(v) for v in rng.integers(1, 10, 2))
        spans = [
            hw[0] + padding[2] + padding[3] - dilation[0] * (kernel[0] - 1),
            hw[1] + padding[0] + padding[1] - dilation[1] * (kernel[1] - 1),
        ]
        if min(spans) < 1:
            continue
        cin = int(rng.choice([1, 3, 63, 65, 130, 200]))
        cout = int(rng.choice([1, 17, 70, 129]))
        residual, affine = (bool(v) for v in rng.integers(0, 2, 2))
        shapes.append(
            (int(rng.integers(1, 4)), cin, cout, hw, kernel, stride, padding, dilation)
            + (residual, affine)
        )
    return shapes


SHAPES += random_shapes(10, seed=7)

# 49 taps x 84 words = 4116 accumulation steps per pixel, every bit differing for channel 0:
# the largest popcounts, 16 per step in each 16-bit lane of the NEON kernel, whose lanes would
# wrap after 4096 steps without its widening (every 4000), and 8 per step in each byte of the
# AVX2 kernel (widened every 31 steps)
SATURATING = (1, 84 * 64, 2, (7, 7), (7, 7), (1, 1), (0, 0, 0, 0), (1, 1), False, False)


def _fail_missing(error: ToolMissing) -> None:
    pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def drivers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Driver]:
    """The driver built once per session for aarch64 (run under qemu) and for the host."""
    root = tmp_path_factory.mktemp("native_driver")
    try:
        qemu = require_tool(QEMU)
        arm = build_driver(
            "aarch64", "aarch64-linux-gnu-gcc", root / "aarch64", (qemu, "-L", SYSROOT)
        )
        host = build_driver("x86_64", "gcc", root / "x86_64")
    except ToolMissing as error:
        _fail_missing(error)
    return {"aarch64": arm, "x86_64": host}


def run_driver(driver: Driver, *args: str, cpu: str | None) -> subprocess.CompletedProcess:
    command = driver.command(*args, cpu=cpu)
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {RUN_TIMEOUT} s (a deadlock?): {' '.join(command)}", pytrace=False)


def info(driver: Driver, cpu: str | None) -> tuple[str, dict[str, dict[str, int]]]:
    """The driver's `info`: the best set's name and, per set, its flags and return codes."""
    done = run_driver(driver, "info", cpu=cpu)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("best ")
    sets = {}
    for line in lines[1:]:
        _, name, *fields = line.split()
        sets[name] = {key: int(value) for key, value in (f.split("=") for f in fields)}
    return lines[0].split()[1], sets


# ----------------------------------------------------------------------- numpy references


def signs(a: np.ndarray) -> np.ndarray:
    """+1/-1 as float64, -1 exactly where a < 0 (so -0.0 and NaN are +1)."""
    return np.where(a < 0, -1.0, 1.0)


def reference_conv(case: Case, w: np.ndarray) -> np.ndarray:
    """float64 multiplier * (sign(x) conv sign(w), +1 padding) + bias (+ residual)."""
    cout = w.shape[0]
    return shared_reference(
        case.x,
        w,
        case.stride,
        case.padding,
        case.dilation,
        case.multiplier[:cout].astype(np.float64),
        case.bias[:cout].astype(np.float64),
        case.residual,
    )


def pack_words(bits: np.ndarray) -> np.ndarray:
    """(..., C) booleans -> (..., ceil(C / 64)) uint64, LSB first, padding bits 0."""
    words = -(-bits.shape[-1] // 64)
    aligned = np.zeros(bits.shape[:-1] + (words * 64,), np.uint8)
    aligned[..., : bits.shape[-1]] = bits
    return np.packbits(aligned, axis=-1, bitorder="little").view("<u8").astype(np.uint64)


def kernel_weights(w: np.ndarray) -> np.ndarray:
    """(cout, cin, kh, kw) floats -> the kernels' (n_blocks, kh * kw * cin_words, 64) words."""
    cout, cin, kh, kw = w.shape
    taps = pack_words(np.transpose(w, (0, 2, 3, 1)) < 0).reshape(cout, -1)
    n_blocks = -(-cout // 64)
    padded = np.zeros((n_blocks * 64, taps.shape[1]), np.uint64)
    padded[:cout] = taps
    return np.ascontiguousarray(padded.reshape(n_blocks, 64, -1).transpose(0, 2, 1))


def reference_pack(case: Case) -> np.ndarray:
    """x packed NHWC with the conv's top/left padding and a zero border."""
    left, right, top, bottom = case.padding
    nhwc = np.transpose(case.x < 0, (0, 2, 3, 1))
    return pack_words(np.pad(nhwc, ((0, 0), (top, bottom), (left, right), (0, 0))))


# ------------------------------------------------------------------------------- the cases


def with_special_values(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sprinkle the values whose bit is easy to get wrong: -0.0, NaN and a tiny negative."""
    specials = np.array([-0.0, 0.0, np.nan, -np.inf, np.inf, -1e-45], np.float32)
    flat = x.reshape(-1)
    at = rng.random(flat.size) < 0.05
    flat[at] = rng.choice(specials, int(at.sum()))
    return x


def make_case(shape: tuple, rng: np.random.Generator) -> tuple[Case, np.ndarray]:
    """A case (for the scalar set, one thread) and its float weights."""
    n, cin, cout, (h, w), kernel, stride, padding, dilation, residual, affine = shape
    x = with_special_values(rng.standard_normal((n, cin, h, w)).astype(np.float32), rng)
    weights = rng.standard_normal((cout, cin, *kernel)).astype(np.float32)
    n_blocks = -(-cout // 64)
    multiplier = np.ones(n_blocks * 64, np.float32)
    bias = np.zeros(n_blocks * 64, np.float32)
    if affine:  # |multiplier| >= 0.25: one popcount off moves an output by 0.5 or more
        multiplier[:cout] = rng.uniform(0.25, 2.0, cout) * rng.choice([-1.0, 1.0], cout)
        bias[:cout] = rng.uniform(-3.0, 3.0, cout)
    # the padding of multiplier and bias is never read into the output: poison it
    multiplier[cout:] = np.nan
    bias[cout:] = np.nan
    out_shape = (
        n,
        cout,
        output_size(h, kernel[0], stride[0], padding[2], padding[3], dilation[0]),
        output_size(w, kernel[1], stride[1], padding[0], padding[1], dilation[1]),
    )
    res = rng.uniform(-4.0, 4.0, out_shape).astype(np.float32) if residual else None
    words = kernel_weights(weights)
    case = Case("scalar", 1, x, cout, kernel, stride, dilation, padding, words, multiplier, bias)
    return replace(case, residual=res), weights


def saturating_case() -> tuple[Case, np.ndarray]:
    n, cin, cout, (h, w), kernel, stride, padding, dilation, _, _ = SATURATING
    x = np.full((n, cin, h, w), -1.0, np.float32)
    weights = np.ones((cout, cin, *kernel), np.float32)
    weights[1] = -1.0  # channel 1 agrees everywhere: popcount 0
    return (
        Case(
            "scalar",
            1,
            x,
            cout,
            kernel,
            stride,
            dilation,
            padding,
            kernel_weights(weights),
            np.ones(64, np.float32),
            np.zeros(64, np.float32),
        ),
        weights,
    )


@pytest.fixture(scope="module")
def cases() -> list[tuple[Case, np.ndarray, bool]]:
    """(case, its float64 reference output, whether the output is an exact integer)."""
    rng = np.random.default_rng(20261201)
    built = [make_case(shape, rng) for shape in SHAPES] + [saturating_case()]
    exact = [not shape[8] and not shape[9] for shape in SHAPES] + [True]
    return [
        (case, reference_conv(case, w), is_exact)
        for (case, w), is_exact in zip(built, exact, strict=True)
    ]


@pytest.fixture(scope="module")
def results(
    drivers: dict[str, Driver],
    cases: list[tuple[Case, np.ndarray, bool]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[tuple, int], list[Result]]:
    """Run every case on a target with 1 or 2 threads: one driver call per target and count.

    The saturating case has a single work unit, so it only runs on 1 thread.
    """
    memo: dict[tuple, list[Result]] = {}

    def run(target: tuple, threads: int) -> list[Result]:
        if (target, threads) not in memo:
            arch, cpu, isa = target
            chosen = cases if threads == 1 else cases[:-1]
            batch = [replace(case, isa=isa, threads=threads) for case, _, _ in chosen]
            folder = tmp_path_factory.mktemp("cases")
            write_cases(folder / "cases.bin", batch)
            args = ("run", str(folder / "cases.bin"), str(folder / "out.bin"))
            done = run_driver(drivers[arch], *args, cpu=cpu)
            assert done.returncode == 0, done.stderr
            memo[target, threads] = read_results(folder / "out.bin", batch)
        return memo[target, threads]

    return run


def host_lacks(drivers: dict[str, Driver], target: tuple) -> bool:
    """Whether ``target`` is a host set this CPU cannot run; then its refusal is checked."""
    arch, cpu, isa = target
    if cpu is not None:
        return False
    _, sets = info(drivers[arch], None)
    if sets[isa]["supported"]:
        return False
    assert sets[isa] == {"compiled": 1, "supported": 0, "pack": -1, "conv": -1}
    return True


# ------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_conv_matches_reference(target, drivers, cases, results):
    if host_lacks(drivers, target):
        return
    one = results(target, 1)
    for index, ((case, expected, exact), got) in enumerate(zip(cases, one, strict=True)):
        assert got.out.shape == expected.shape, f"case {index}"
        if exact:  # +-1 dot products: small integers, exact in float32
            np.testing.assert_array_equal(got.out, expected, err_msg=f"case {index}")
        else:  # float32 multiply and adds: a few ulps of the largest term
            k_bits = case.x.shape[1] * case.kernel[0] * case.kernel[1]
            scale = np.abs(case.multiplier[: case.cout]).max() * k_bits + 8.0
            np.testing.assert_allclose(
                got.out, expected, rtol=0, atol=4e-7 * scale, err_msg=f"case {index}"
            )


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_pack_matches_numpy_packing(target, drivers, cases, results):
    if host_lacks(drivers, target):
        return
    one = results(target, 1)
    for index, ((case, _, _), got) in enumerate(zip(cases, one, strict=True)):
        np.testing.assert_array_equal(got.packed, reference_pack(case), err_msg=f"case {index}")


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_one_and_two_threads_give_identical_bits(target, drivers, results):
    if host_lacks(drivers, target):
        return
    one, two = results(target, 1), results(target, 2)
    for index, (a, b) in enumerate(zip(one, two, strict=False)):
        np.testing.assert_array_equal(a.packed, b.packed, err_msg=f"case {index}")
        np.testing.assert_array_equal(
            a.out.view(np.uint32), b.out.view(np.uint32), err_msg=f"case {index}"
        )


@pytest.mark.parametrize(
    "cpu,best,unsupported",
    [("max", "neon_dotprod", set()), ("cortex-a72", "neon", {"neon_dotprod"})],
)
def test_dispatcher_picks_the_best_set_the_cpu_has(drivers, cpu, best, unsupported):
    chosen, sets = info(drivers["aarch64"], cpu)
    assert chosen == best
    for name in ("avx2", "avx512"):  # not built for ARM
        assert sets[name] == {"compiled": 0, "supported": 0, "pack": -1, "conv": -1}
    for name in ("scalar", "neon", "neon_dotprod"):
        runs = name not in unsupported
        code = 0 if runs else -1  # BF_ERR_ISA
        assert sets[name] == {"compiled": 1, "supported": int(runs), "pack": code, "conv": code}


def test_forcing_dot_product_on_a_cortex_a72_fails_loudly(drivers, cases, tmp_path):
    case = replace(cases[0][0], isa="neon_dotprod")
    write_cases(tmp_path / "cases.bin", [case])
    done = run_driver(
        drivers["aarch64"],
        "run",
        str(tmp_path / "cases.bin"),
        str(tmp_path / "out.bin"),
        cpu="cortex-a72",
    )
    assert done.returncode == 1
    assert "bf_pack(isa=neon_dotprod, threads=1) returned -1 (BF_ERR_ISA)" in done.stderr
    assert not (tmp_path / "out.bin").exists()


def test_host_dispatcher_picks_the_best_set_the_cpu_has(drivers):
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    avx512 = {"avx512f", "avx512vl", "avx512dq", "avx512bw", "avx512_vpopcntdq"} <= flags
    avx2 = {"avx2", "popcnt"} <= flags
    chosen, sets = info(drivers["x86_64"], None)
    assert chosen == ("avx512" if avx512 else "avx2" if avx2 else "scalar")
    assert sets["avx512"]["supported"] == int(avx512)
    assert sets["avx2"]["supported"] == int(avx2)
    assert sets["neon"]["compiled"] == sets["neon_dotprod"]["compiled"] == 0
