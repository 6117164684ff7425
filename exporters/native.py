"""The native kernel library: find it, load it with ctypes, choose its instruction set.

The library (``exporters/_native*.so``, built from ``exporters/csrc`` by ``pip install``) is
plain C with no Python dependency: ctypes calls it with pointers into numpy arrays, and the
call releases the GIL while the kernel runs. It holds one copy of every kernel per instruction
set the compiler could build (AVX-512 VPOPCNTDQ, AVX2 and scalar on x86-64; NEON with and
without the dot-product extension and scalar on AArch64) and reports which of them the running
CPU has; :func:`library` picks the fastest, or the one ``BITFLEET_ISA`` names.

An install without a C compiler still succeeds (the extension is optional); then
:func:`library` returns None and :mod:`exporters.kernels` runs its numpy fallback, saying so
once in the log.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["NativeLibrary", "NativeError", "library", "ISA_NAMES", "BfConv"]

ISA_NAMES = ("scalar", "avx2", "avx512", "neon", "neon_dotprod")
"""The instruction sets, numbered as in ``csrc/bitfleet_native.h``."""

ABI_VERSION = 1
"""The C interface this module speaks (``BF_ABI_VERSION``)."""

_ERRORS = {-1: "instruction set not available", -2: "invalid argument", -3: "out of memory"}

log = logging.getLogger("bitfleet.runtime")


class NativeError(RuntimeError):
    """The native library refused a call or cannot be used as asked."""


class BfConv(ctypes.Structure):
    """``struct bf_conv``: a binary convolution with weights in the kernel layout."""

    _fields_ = [
        ("in_channels", ctypes.c_int64),
        ("out_channels", ctypes.c_int64),
        ("kernel_h", ctypes.c_int64),
        ("kernel_w", ctypes.c_int64),
        ("stride_h", ctypes.c_int64),
        ("stride_w", ctypes.c_int64),
        ("dilation_h", ctypes.c_int64),
        ("dilation_w", ctypes.c_int64),
        ("pad_top", ctypes.c_int64),
        ("pad_bottom", ctypes.c_int64),
        ("pad_left", ctypes.c_int64),
        ("pad_right", ctypes.c_int64),
        ("cin_words", ctypes.c_int64),
        ("n_blocks", ctypes.c_int64),
        ("weights", ctypes.c_void_p),
        ("multiplier", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
    ]


def _library_path() -> Path | None:
    """``BITFLEET_NATIVE_LIB`` if set, else the extension built next to this module."""
    override = os.environ.get("BITFLEET_NATIVE_LIB")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_native{suffix}"
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class NativeLibrary:
    """The loaded library and the instruction set its calls use."""

    path: Path
    isa: str
    supported: tuple[str, ...]
    compiled: tuple[str, ...]
    _lib: ctypes.CDLL

    @property
    def isa_index(self) -> int:
        return ISA_NAMES.index(self.isa)

    def with_isa(self, isa: str) -> NativeLibrary:
        """The same library running another instruction set (tests and benchmarks)."""
        if isa not in self.supported:
            raise NativeError(
                f"instruction set {isa!r} is not usable here; this CPU and build support "
                f"{', '.join(self.supported)}"
            )
        return NativeLibrary(self.path, isa, self.supported, self.compiled, self._lib)

    def check(self, code: int, what: str) -> None:
        """Raise :class:`NativeError` for a non-zero return code of ``what``."""
        if code != 0:
            reason = _ERRORS.get(code, f"error {code}")
            raise NativeError(f"native {what} failed ({self.isa}): {reason}")

    @property
    def conv2d(self) -> Any:
        """``bf_conv2d`` (a ctypes function: arguments as declared in :func:`_declare`)."""
        return self._lib.bf_conv2d

    @property
    def pack(self) -> Any:
        """``bf_pack`` (a ctypes function)."""
        return self._lib.bf_pack


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.bf_abi_version.restype = cint
    lib.bf_abi_version.argtypes = []
    lib.bf_isa_name.restype = ctypes.c_char_p
    lib.bf_isa_name.argtypes = [cint]
    for name in ("bf_isa_compiled", "bf_isa_supported"):
        getattr(lib, name).restype = cint
        getattr(lib, name).argtypes = [cint]
    lib.bf_best_isa.restype = cint
    lib.bf_best_isa.argtypes = []
    lib.bf_pack.restype = cint
    lib.bf_pack.argtypes = [cint, cint, ptr, i64, i64, i64, i64, i64, i64, i64, i64, ptr]
    lib.bf_conv2d.restype = cint
    lib.bf_conv2d.argtypes = [ctypes.POINTER(BfConv), cint, cint, ptr, i64, i64, i64, ptr, ptr]


_loaded: NativeLibrary | None = None
_tried = False
_lock = threading.Lock()  # the agent's threads may ask at once: load (and warn) only once


def _load(path: Path) -> NativeLibrary:
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, AttributeError) as err:
        raise NativeError(f"cannot load the native kernels {path}: {err}") from None
    version = lib.bf_abi_version()
    if version != ABI_VERSION:
        raise NativeError(
            f"the native kernels {path} speak interface {version}, this bitfleet needs "
            f"{ABI_VERSION}; reinstall bitfleet so they are rebuilt"
        )
    compiled = tuple(n for i, n in enumerate(ISA_NAMES) if lib.bf_isa_compiled(i))
    supported = tuple(n for i, n in enumerate(ISA_NAMES) if lib.bf_isa_supported(i))
    wanted = os.environ.get("BITFLEET_ISA", "").strip()
    if wanted:
        if wanted not in supported:
            raise NativeError(
                f"BITFLEET_ISA={wanted} is not usable here; this CPU and build support "
                f"{', '.join(supported)} (unset BITFLEET_ISA to pick the fastest)"
            )
        isa = wanted
    else:
        isa = ISA_NAMES[lib.bf_best_isa()]
    return NativeLibrary(path, isa, supported, compiled, lib)


def library() -> NativeLibrary | None:
    """The native library (loaded once), or None when this install has none.

    A library that exists but cannot be used (wrong interface version, unusable
    ``BITFLEET_ISA``) raises :class:`NativeError`: that is a broken install, not a choice.
    """
    global _loaded, _tried
    if _tried:
        return _loaded
    with _lock:
        if _tried:
            return _loaded
        path = _library_path()
        if path is not None and not path.is_file():
            raise NativeError(f"BITFLEET_NATIVE_LIB={path} does not exist")
        _loaded = _load(path) if path is not None else None
        _tried = True
        if _loaded is None:
            log.warning(
                "bitfleet's native kernels are not built (no C compiler at install time?): "
                "binary layers run in numpy, several times slower; install a C compiler "
                "(gcc) and reinstall bitfleet to build them"
            )
        return _loaded
