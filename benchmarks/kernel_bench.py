"""Binary conv kernel vs ONNX Runtime's FP32 Conv on the Bi-Real/ResNet 3x3 shapes.

For each shape (batch 1, stride 1, pad 1) and thread count, runs ORT's FP32 Conv (a one-node
ONNX model, intra_op threads = threads, inter_op 1) and bitfleet's ``binary_conv2d`` full call
(prepared weights; binarize+pack of the float input, XNOR-popcount conv and the fused
batch-norm epilogue all included) alternately, and reports medians after warm-up. Alternating
spreads any slow phase of a shared machine over both sides. ORT's intra-op threads are told not
to spin between runs (``--ort-spinning`` restores its default): spinning ORT threads and
numba's spinning OpenMP workers starve each other on a 2-core machine, which would measure
the contention (tens of ms), not the kernels.

The numba first-call time (JIT compile with an empty cache, then a load from the on-disk
cache) is measured separately, in fresh processes, so it does not touch the table.

    python benchmarks/kernel_bench.py --repeats 200
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Imported before anything else loads numba, so its environment set-up applies.
from exporters import kernels  # noqa: E402, I001
from exporters.packing import pack_conv_weight  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SHAPES = [(56, 64), (28, 128), (14, 256), (7, 512)]  # (H = W, C = Cin = Cout), 3x3 s1 p1

FIRST_CALL = """
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
t0 = time.perf_counter()
from exporters import kernels
from exporters.packing import pack_conv_weight
t1 = time.perf_counter()
w = np.random.default_rng(0).standard_normal((64, 64, 3, 3)).astype(np.float32)
conv = kernels.prepare_conv_weight(pack_conv_weight(w), in_channels=64, kernel_size=3, padding=1)
x = np.random.default_rng(1).standard_normal((1, 64, 56, 56)).astype(np.float32)
t2 = time.perf_counter()
conv(x)
t3 = time.perf_counter()
conv(x)
t4 = time.perf_counter()
print(t1 - t0, t3 - t2, t4 - t3)
"""


def ort_conv_session(weight: np.ndarray, threads: int, spinning: bool) -> ort.InferenceSession:
    """A one-node FP32 Conv model (3x3, stride 1, pad 1) in an ORT session on ``threads``."""
    cout, cin, kh, kw = weight.shape
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[kh, kw], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def interleaved(fns: list, repeats: int, warmup: int) -> list[float]:
    """Median seconds of each callable, calling them in turn ``repeats`` times after warm-up."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def first_call_times() -> tuple[list[float], list[float]]:
    """(import, first call, second call) seconds: with an empty cache, then from the cache."""
    code = FIRST_CALL.format(root=str(ROOT))
    runs = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
            ).stdout
            runs.append([float(v) for v in out.split()])
    return runs[0], runs[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> str:
    import llvmlite.binding as llvm

    features = os.environ.get("NUMBA_CPU_FEATURES", "")
    width = "512-bit (prefer-256-bit off)" if "-prefer-256-bit" in features else "LLVM default"
    return "\n".join(
        [
            f"- CPU: {cpu_model()} (LLVM: {llvm.get_host_cpu_name()}), {os.cpu_count()} cores",
            f"- Python {platform.python_version()}, numpy {np.__version__}, numba "
            f"{numba.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}",
            f"- numba vector width: {width}; NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per side (>= 50)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip-first-call", action="store_true")
    ap.add_argument(
        "--ort-spinning",
        action="store_true",
        help="let ORT's intra-op threads spin between runs (its default; they then starve "
        "numba's threads on a 2-core machine)",
    )
    args = ap.parse_args(argv)

    cold = warm = None
    if not args.skip_first_call:
        cold, warm = first_call_times()

    rng = np.random.default_rng(0)
    rows = []
    for size, channels in SHAPES:
        x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
        w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32)
        conv = kernels.prepare_conv_weight(
            pack_conv_weight(w),
            in_channels=channels,
            kernel_size=3,
            padding=1,
            multiplier=rng.uniform(0.1, 1.0, channels).astype(np.float32),
            bias=rng.standard_normal(channels).astype(np.float32),
        )
        for threads in args.threads:
            sess = ort_conv_session(w, threads, args.ort_spinning)
            t_ort, t_bin = interleaved(
                [
                    lambda s=sess, x=x: s.run(None, {"x": x}),
                    lambda c=conv, x=x, t=threads: c(x, threads=t),
                ],
                args.repeats,
                args.warmup,
            )
            rows.append((size, channels, threads, t_ort, t_bin))

    print("Machine:")
    print(machine_info())
    print()
    spin = "on" if args.ort_spinning else "off"
    print(
        f"binary_conv2d vs ORT FP32 Conv, 3x3 s1 p1, batch 1, median of {args.repeats} "
        f"interleaved calls after {args.warmup} warm-up (ORT intra-op spinning {spin}):"
    )
    print()
    print("| shape (HxWxCin->Cout) | threads | ORT FP32 ms | binary ms | speed-up |")
    print("|---|---|---|---|---|")
    for size, channels, threads, t_ort, t_bin in rows:
        print(
            f"| {size}x{size}x{channels}->{channels} | {threads} | {t_ort * 1e3:.3f} | "
            f"{t_bin * 1e3:.3f} | {t_ort / t_bin:.1f}x |"
        )
    if cold is not None and warm is not None:
        print()
        print(
            "numba first call (fresh process, 56x56x64 conv; import of exporters.kernels separate):"
        )
        print(
            f"- empty cache (JIT compile): import {cold[0]:.2f} s, first call {cold[1]:.2f} s, "
            f"second call {cold[2] * 1e3:.2f} ms"
        )
        print(
            f"- warm cache (load from disk): import {warm[0]:.2f} s, first call "
            f"{warm[1]:.3f} s, second call {warm[2] * 1e3:.2f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
