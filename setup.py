"""Builds the native kernels (``exporters/_native``); everything else is in pyproject.toml.

The kernels are one C source per instruction set (``exporters/csrc/isa.json``), each compiled
with its own flags, plus a dispatcher compiled without any, which checks the CPU at run time
before calling a set. The extension is optional: without a C compiler the install still
succeeds and the runtime falls back to numpy (and says so once). The library has no Python
dependency; ``exporters.native`` loads it with ctypes.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = Path("exporters") / "csrc"
ARCHITECTURES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class BuildNative(build_ext):
    """Compile each instruction set's object with its flags, then link them into the library."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "exporters._native":
            super().build_extension(ext)
            return
        from distutils.errors import CompileError

        if self.compiler.compiler_type not in ("unix", "mingw32", "cygwin"):
            raise CompileError("bitfleet's native kernels need gcc or clang")
        config = json.loads((CSRC / "isa.json").read_text())
        sets = config["sets"].get(ARCHITECTURES.get(platform.machine().lower(), ""), {})
        if not sets:  # another architecture: the portable set only
            sets = {"scalar": {"source": "isa_scalar.c", "flags": []}}
        objects: list[str] = []
        built: list[str] = []
        for name, spec in sets.items():
            try:
                objects += self.compiler.compile(
                    [str(CSRC / spec["source"])],
                    output_dir=str(Path(self.build_temp) / f"isa_{name}"),
                    include_dirs=[str(CSRC)],
                    extra_postargs=config["common"] + spec["flags"],
                )
                built.append(name)
            except CompileError:
                if name == "scalar":
                    raise
                print(f"bitfleet: this compiler cannot build the {name} kernels; left out")
        ext.extra_objects = objects
        ext.define_macros = [(f"BF_HAVE_{name.upper()}", "1") for name in built]
        ext.extra_compile_args = list(config["common"])
        print(f"bitfleet: native kernels for {', '.join(built)}")
        super().build_extension(ext)


native = Extension(
    "exporters._native",
    sources=[
        str(CSRC / source) for source in json.loads((CSRC / "isa.json").read_text())["support"]
    ],
    include_dirs=[str(CSRC)],
    libraries=["pthread"],
    optional=True,
)

setup(ext_modules=[native], cmdclass={"build_ext": BuildNative})
