"""The native kernels as an install builds them: with a compiler, and without one.

An install on a machine without a C compiler must still succeed (the extension is optional),
and the runtime must then run the binary layers in numpy, exactly, after one clear message.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from install_support import copy_source

CHECK = r"""
import logging, sys
import numpy as np
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from exporters import kernels
from exporters.packing import pack_conv_weight
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 70, 9, 11)).astype(np.float32)
w = rng.standard_normal((33, 70, 3, 3)).astype(np.float32)
conv = kernels.prepare_conv_weight(pack_conv_weight(w), in_channels=70, kernel_size=3, padding=1)
got = conv(x)
again = conv(x, threads=2)
signs = np.pad(np.where(x < 0, -1.0, 1.0), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=1)
ws = np.where(w < 0, -1.0, 1.0)
want = sum(
    np.einsum("oc,nchw->nohw", ws[:, :, ky, kx], signs[:, :, ky : ky + 9, kx : kx + 11])
    for ky in range(3) for kx in range(3)
)
assert (got == want).all() and (again == want).all(), "numpy fallback is not exact"
print(kernels.backend())
"""


@pytest.mark.slow
def test_install_without_a_compiler_falls_back_with_one_message(tmp_path):
    source = tmp_path / "src"
    copy_source(source)
    target = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["CC"] = "/bin/false"  # a compiler that fails every compilation
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["--target", str(target), str(source)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    assert not list((target / "exporters").glob("_native*")), "a library was built with no CC"
    run_env = {k: v for k, v in os.environ.items() if k != "BITFLEET_NATIVE_LIB"}
    run_env["PYTHONPATH"] = str(target)
    run = subprocess.run(
        [sys.executable, "-c", CHECK],
        capture_output=True,
        text=True,
        env=run_env,
        cwd=tmp_path,  # never the checkout: only the installed package may be found
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "numpy"
    warnings = [line for line in run.stderr.splitlines() if "native kernels are not built" in line]
    assert len(warnings) == 1, run.stderr
    assert "install a C compiler" in warnings[0]


def test_the_extension_needs_no_python_symbols():
    """The library is plain C loaded by ctypes: it must not depend on libpython."""
    from exporters import native

    library = native.library()
    assert library is not None
    linked = subprocess.run(["ldd", str(library.path)], capture_output=True, text=True).stdout
    assert "libpython" not in linked
    undefined = subprocess.run(
        ["nm", "-D", "--undefined-only", str(library.path)], capture_output=True, text=True
    ).stdout
    assert "Py" not in undefined, undefined
