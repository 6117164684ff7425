"""Native binary conv kernels vs ONNX Runtime's FP32 Conv on the Bi-Real/ResNet 3x3 shapes.

For each shape (batch 1, stride 1, pad 1) and thread count, runs ORT's FP32 Conv (a one-node
ONNX model, intra_op threads = threads, inter_op 1) and bitfleet's ``binary_conv2d`` full call
(prepared weights; binarize+pack of the float input, XNOR-popcount conv and the fused
batch-norm-like multiplier/bias epilogue all included) once per instruction set this CPU runs
(``exporters.native.library().supported``: e.g. avx512, avx2, scalar), all interleaved, and
reports medians after warm-up and each set's speed-up over ORT. Interleaving spreads any slow
phase of a shared machine over every column. ORT's intra-op threads are told not to spin
between runs (``--ort-spinning`` restores its default): on a 2-core machine spinning ORT
threads would steal the cores the kernels' pool wakes up on, measuring the contention rather
than the kernels. Before timing, every set's output is checked against the first set's.

The kernels are plain C, loaded with ctypes: nothing compiles at run time. The first-call
figures (fresh processes: import of ``exporters.kernels``, prepare, first and second call)
show that the first call costs what the others do, plus the library's one-time load.

    python benchmarks/kernel_bench.py --repeats 200
    python benchmarks/kernel_bench.py --threads 1 --isa avx512 scalar --repeats 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from exporters import kernels, native  # noqa: E402
from exporters.packing import pack_conv_weight  # noqa: E402

SHAPES = [(56, 64), (28, 128), (14, 256), (7, 512)]  # (H = W, C = Cin = Cout), 3x3 s1 p1

FIRST_CALL = """
import sys, time, json
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
from exporters import kernels
t1 = time.perf_counter()
import numpy as np
from exporters.packing import pack_conv_weight
rng = np.random.default_rng(0)
w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
x = rng.standard_normal((1, 64, 56, 56)).astype(np.float32)
t2 = time.perf_counter()
conv = kernels.prepare_conv_weight(pack_conv_weight(w), in_channels=64, kernel_size=3, padding=1)
t3 = time.perf_counter()
conv(x, threads=1)
t4 = time.perf_counter()
conv(x, threads=1)
t5 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "prepare": t3 - t2, "first": t4 - t3, "second": t5 - t4,
                  "backend": kernels.backend()}}))
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


def interleaved(fns: list[Callable[[], object]], repeats: int, warmup: int) -> list[float]:
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


def first_call_times(runs: int) -> dict[str, float | str]:
    """Median over ``runs`` fresh processes of import / prepare / first / second call seconds."""
    code = FIRST_CALL.format(root=str(ROOT))
    results = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", code], check=True, capture_output=True, text=True
            ).stdout
        )
        for _ in range(runs)
    ]
    out: dict[str, float | str] = {
        key: statistics.median(r[key] for r in results)
        for key in ("import", "prepare", "first", "second")
    }
    out["backend"] = results[0]["backend"]
    return out


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(sets: list[str], threads: list[int]) -> str:
    """Markdown bullet list of the facts that the table's figures depend on."""
    lib = native.library()
    supported = ", ".join(lib.supported) if lib is not None else "none (no native library)"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return "\n".join(
        [
            f"- CPU: {cpu_model()}, {os.cpu_count()} logical CPUs ({cores} usable here)",
            f"- Python {platform.python_version()}, numpy {np.__version__}, onnxruntime "
            f"{ort.__version__}, onnx {onnx.__version__}",
            f"- kernels.backend(): {kernels.backend()} (BITFLEET_ISA="
            f"{os.environ.get('BITFLEET_ISA') or 'unset'}); sets this CPU runs: {supported}; "
            f"measured: {', '.join(sets)}",
            f"- threads measured: {', '.join(map(str, threads))} (ORT intra_op = kernel pool "
            "threads = the row's count)",
        ]
    )


def instruction_sets(wanted: list[str] | None) -> list[str]:
    """The sets to measure: all this CPU runs, fastest first, or ``wanted`` checked against them."""
    lib = native.library()
    if lib is None:
        raise SystemExit("the native library is not built (pip install -e . with a C compiler)")
    preference = ["avx512", "avx2", "neon_dotprod", "neon", "scalar"]
    supported = [s for s in preference if s in lib.supported]
    if not wanted:
        return supported
    unknown = [s for s in wanted if s not in supported]
    if unknown:
        raise SystemExit(
            f"--isa {' '.join(unknown)}: not usable here; this CPU runs {', '.join(supported)}"
        )
    return list(dict.fromkeys(wanted))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per column")
    ap.add_argument("--warmup", type=int, default=20, help="untimed calls per column first")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts")
    ap.add_argument(
        "--isa", nargs="+", help="instruction sets to measure (default: every one this CPU runs)"
    )
    ap.add_argument(
        "--first-call-runs", type=int, default=3, help="fresh processes for the first-call times"
    )
    ap.add_argument("--skip-first-call", action="store_true")
    ap.add_argument(
        "--ort-spinning",
        action="store_true",
        help="let ORT's intra-op threads spin between runs (its default; on 2 cores they then "
        "steal the kernels' cores)",
    )
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or min(args.threads) < 1:
        raise SystemExit("--repeats and --threads must be >= 1, --warmup >= 0")
    sets = instruction_sets(args.isa)

    first = None if args.skip_first_call else first_call_times(args.first_call_runs)

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
        reference = kernels.binary_conv2d(x, conv, threads=1, isa=sets[0])
        for isa in sets[1:]:
            got = kernels.binary_conv2d(x, conv, threads=1, isa=isa)
            if not np.allclose(got, reference, rtol=1e-5, atol=1e-4):
                raise SystemExit(f"{isa} disagrees with {sets[0]} on {size}x{size}x{channels}")
        for threads in args.threads:
            sess = ort_conv_session(w, threads, args.ort_spinning)
            fns: list[Callable[[], object]] = [partial(sess.run, None, {"x": x})]
            fns += [partial(kernels.binary_conv2d, x, conv, threads=threads, isa=i) for i in sets]
            t_ort, *t_sets = interleaved(fns, args.repeats, args.warmup)
            rows.append((size, channels, threads, t_ort, t_sets))

    print("Machine:")
    print(machine_info(sets, args.threads))
    print()
    spin = "on" if args.ort_spinning else "off"
    print(
        f"binary_conv2d (prepared weights, pack + conv + multiplier/bias epilogue) vs ORT FP32 "
        f"Conv, 3x3 s1 p1, batch 1, median of {args.repeats} interleaved calls after "
        f"{args.warmup} warm-up (ORT intra-op spinning {spin}); speed-up = ORT ms / set ms:"
    )
    print()
    header = "| shape (HxWxCin->Cout) | threads | ORT FP32 ms |"
    header += "".join(f" {s} ms | {s} speed-up |" for s in sets)
    print(header)
    print("|---|---|---|" + "---|---|" * len(sets))
    for size, channels, threads, t_ort, t_sets in rows:
        cells = "".join(f" {t * 1e3:.3f} | {t_ort / t:.1f}x |" for t in t_sets)
        print(f"| {size}x{size}x{channels}->{channels} | {threads} | {t_ort * 1e3:.3f} |{cells}")
    if first is not None:
        print()
        print(
            f"First call (median of {args.first_call_runs} fresh processes, 56x56x64 conv, "
            f"1 thread, {first['backend']}; no compilation: the kernels are prebuilt C):"
        )
        print(
            f"- import exporters.kernels {float(first['import']) * 1e3:.1f} ms, prepare "
            f"{float(first['prepare']) * 1e3:.2f} ms, first call "
            f"{float(first['first']) * 1e3:.2f} ms (includes loading the library), second call "
            f"{float(first['second']) * 1e3:.2f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
