"""Build tests/native/conv_driver.c against the native kernels, for any architecture.

The tests of the ARM kernels run on an x86 machine: they cross-compile the library's sources
with ``aarch64-linux-gnu-gcc`` and run the driver under ``qemu-aarch64``. The objects are
compiled the way setup.py compiles the real library (flags and sources from
exporters/csrc/isa.json: every set's source with the common flags plus its own, the support
sources with the common flags and ``-DBF_HAVE_<SET>`` for each set that compiled), so what
is tested is what a device builds. Also: the case and result files the driver reads and
writes (their format is documented at the top of conv_driver.c).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "exporters" / "csrc"
DRIVER = Path(__file__).resolve().parent / "native" / "conv_driver.c"

# what to install when a tool is missing: a missing part fails the run, it never skips
APT_PACKAGES = {
    "gcc": "gcc",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu libc6-dev-arm64-cross",
    "qemu-aarch64": "qemu-user",
}


class ToolMissing(RuntimeError):
    """A compiler or emulator the tests need is not installed."""


def require_tool(name: str) -> str:
    """The path of executable ``name``, or ToolMissing saying which apt packages provide it."""
    path = shutil.which(name)
    if path is None:
        packages = APT_PACKAGES.get(name, name)
        raise ToolMissing(f"{name} not found: apt-get install {packages}")
    return path


@dataclass(frozen=True)
class Driver:
    """A built conv_driver: run it with ``command + [args]`` (an emulator prefix included)."""

    path: Path
    arch: str
    sets: tuple[str, ...]  # the instruction sets compiled into it
    emulator: tuple[str, ...] = ()

    def command(self, *args: str, cpu: str | None = None) -> list[str]:
        """The command line running the driver with ``args`` (on emulated ``cpu`` if any)."""
        prefix = list(self.emulator)
        if cpu is not None:
            if not prefix:
                raise ValueError("a CPU model needs an emulator")
            prefix += ["-cpu", cpu]
        return [*prefix, str(self.path), *args]


def _run_compiler(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compile failed: {' '.join(args)}\n{done.stderr}")


def build_driver(
    arch: str, cc: str, out_dir: Path, emulator: Sequence[str] = (), csrc: Path = CSRC
) -> Driver:
    """Compile the kernels of ``arch`` (a key of isa.json's "sets") and the driver with ``cc``.

    Every set of the architecture must compile (unlike setup.py, which leaves out the sets an
    old compiler cannot build): a test build that silently lacked a set would test less.
    """
    compiler = require_tool(cc)
    config = json.loads((csrc / "isa.json").read_text())
    sets: dict[str, dict] = config["sets"][arch]
    common: list[str] = list(config["common"])
    out_dir.mkdir(parents=True, exist_ok=True)
    objects: list[str] = []
    for name, spec in sets.items():
        obj = out_dir / f"isa_{name}.o"
        _run_compiler(
            [compiler, *common, *spec["flags"], f"-I{csrc}", "-c", str(csrc / spec["source"])]
            + ["-o", str(obj)]
        )
        objects.append(str(obj))
    have = [f"-DBF_HAVE_{name.upper()}=1" for name in sets]
    for source in config["support"]:
        obj = out_dir / f"{Path(source).stem}.o"
        _run_compiler(
            [compiler, *common, *have, f"-I{csrc}", "-c", str(csrc / source), "-o", str(obj)]
        )
        objects.append(str(obj))
    exe = out_dir / "conv_driver"
    _run_compiler(
        [compiler, "-O2", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Werror", f"-I{csrc}"]
        + [str(DRIVER), *objects, "-o", str(exe), "-lpthread"]
    )
    return Driver(exe, arch, tuple(sets), tuple(emulator))


# ------------------------------------------------------------------------- case files


@dataclass
class Case:
    """One binary convolution for the driver: geometry, inputs in the kernel's layout."""

    isa: str
    threads: int
    x: np.ndarray  # float32 (n, cin, h, w)
    cout: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]  # (left, right, top, bottom), bitfleet's order
    weights: np.ndarray  # uint64 (n_blocks, kh * kw * cin_words, 64)
    multiplier: np.ndarray  # float32 (n_blocks * 64,)
    bias: np.ndarray  # float32 (n_blocks * 64,)
    residual: np.ndarray | None = field(default=None)  # float32 (n, cout, out_h, out_w)


@dataclass(frozen=True)
class Result:
    """What the driver returned for one case."""

    packed: np.ndarray  # uint64 (n, padded_h, padded_w, cin_words)
    out: np.ndarray  # float32 (n, cout, out_h, out_w)


def output_size(size: int, kernel: int, stride: int, before: int, after: int, dil: int) -> int:
    return (size + before + after - dil * (kernel - 1) - 1) // stride + 1


def write_cases(path: Path, cases: Sequence[Case]) -> None:
    """Write ``cases`` in the driver's case-file format."""
    parts = [b"BFCASES1", struct.pack("<q", len(cases))]
    for case in cases:
        n, cin, h, w = case.x.shape
        left, right, top, bottom = case.padding
        name = case.isa.encode()
        if len(name) > 16:
            raise ValueError(f"set name too long: {case.isa}")
        geometry = [n, cin, case.cout, h, w, *case.kernel, *case.stride, *case.dilation]
        geometry += [top, bottom, left, right, int(case.residual is not None)]
        parts += [name.ljust(16, b"\0"), struct.pack("<17q", case.threads, *geometry)]
        parts += [np.ascontiguousarray(case.x, "<f4").tobytes()]
        parts += [np.ascontiguousarray(case.weights, "<u8").tobytes()]
        parts += [np.ascontiguousarray(a, "<f4").tobytes() for a in (case.multiplier, case.bias)]
        if case.residual is not None:
            parts.append(np.ascontiguousarray(case.residual, "<f4").tobytes())
    path.write_bytes(b"".join(parts))


def read_results(path: Path, cases: Sequence[Case]) -> list[Result]:
    """Read the driver's output file for ``cases``, shaped as each case's geometry says."""
    data = path.read_bytes()
    if data[:8] != b"BFOUTS01":
        raise ValueError(f"{path} is not a driver output file")
    (count,) = struct.unpack_from("<q", data, 8)
    if count != len(cases):
        raise ValueError(f"{path} holds {count} results for {len(cases)} cases")
    at, results = 16, []
    for case in cases:
        n, cin, h, w = case.x.shape
        left, right, top, bottom = case.padding
        (kh, kw), (sh, sw), (dh, dw) = case.kernel, case.stride, case.dilation
        packed_shape = (n, h + top + bottom, w + left + right, -(-cin // 64))
        out_shape = (
            n,
            case.cout,
            output_size(h, kh, sh, top, bottom, dh),
            output_size(w, kw, sw, left, right, dw),
        )
        arrays = []
        for shape, dtype in ((packed_shape, "<u8"), (out_shape, "<f4")):
            (size,) = struct.unpack_from("<q", data, at)
            if size != int(np.prod(shape)):
                raise ValueError(f"driver returned {size} values where {shape} was expected")
            at += 8
            arrays.append(np.frombuffer(data, dtype, size, at).reshape(shape))
            at += size * np.dtype(dtype).itemsize
        results.append(Result(arrays[0].astype(np.uint64), arrays[1].astype(np.float32)))
    if at != len(data):
        raise ValueError(f"{len(data) - at} trailing bytes in {path}")
    return results
