"""TFLite against the ONNX formats: Bi-Real-18 at 224, sizes, latency at 1 and 2 threads, memory.

Bi-Real-18 (ImageNet stem, 1000 classes, random weights: sizes and speed do not depend on
them) is exported as:

- ``tflite`` with every binary layer in the ``int8`` form, in the ``int4`` form (the same
  convolutions, weights stored two to a byte) and in the ``float`` form;
- ``tflite`` with int8 float parts (``--float-parts int8``, int8 and int4 binary forms);
- TFLite FP32: the same network with its quantizers off (``float_twin``), through the same
  writer, so every layer is a float CONV_2D: the baseline of the TFLite rows;
- ``onnx-portable`` (stock ONNX Runtime) and the fast ``onnx`` (bitfleet's kernels);
- FP32 ONNX in ONNX Runtime: the baseline of the ONNX rows and of every size ratio.

Latency: ``predict`` at batch 1 through ``exporters.runtime.load``, median of ``--repeats``
after ``--warmup``, for each thread count. Each artifact is timed in turn (interleaved) with
the others of its group: the ONNX Runtime rows, then the TFLite rows. Groups are timed apart
because ONNX Runtime's idle threads spin for a while after each call and would take the
second core from a TFLite call that follows (measured: TFLite at 2 threads slower than at 1).
Memory: for each artifact a fresh process loads it, runs one ``predict`` and reports its
resident set (``benchmarks/runtime_bench.py``'s probe).

    python benchmarks/tflite_bench.py --threads 1 2 --repeats 30
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.runtime_bench import memory  # noqa: E402

# (label, baseline label, format, export keyword arguments, float twin?)
ROWS = [
    ("FP32 ONNX (ORT)", None, "onnx-portable", {}, True),
    ("onnx-portable (ORT)", "FP32 ONNX (ORT)", "onnx-portable", {}, False),
    ("onnx (bitfleet kernels)", "FP32 ONNX (ORT)", "onnx", {}, False),
    ("TFLite FP32", None, "tflite", {}, True),
    ("tflite, float form", "TFLite FP32", "tflite", {"binary_form": "float"}, False),
    ("tflite, int8 form", "TFLite FP32", "tflite", {"binary_form": "int8"}, False),
    ("tflite, int4 form", "TFLite FP32", "tflite", {"binary_form": "int4"}, False),
    (
        "tflite, int4 form, int8 float parts",
        "TFLite FP32",
        "tflite",
        {"binary_form": "int4", "float_parts": "int8"},
        False,
    ),
    (
        "tflite, int8 form, int8 float parts",
        "TFLite FP32",
        "tflite",
        {"binary_form": "int8", "float_parts": "int8"},
        False,
    ),
]


def _interleaved(predictors: dict, x: np.ndarray, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of each predictor, timed in turn; the predictors are dropped afterwards."""
    times: dict[str, list[float]] = {label: [] for label in predictors}
    for _ in range(warmup):
        for predictor in predictors.values():
            predictor.predict(x)
    for _ in range(repeats):
        for label, predictor in predictors.items():
            started = time.perf_counter()
            predictor.predict(x)
            times[label].append(time.perf_counter() - started)
    predictors.clear()  # ONNX Runtime's threads end with their sessions
    return {label: statistics.median(values) * 1e3 for label, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=1000)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch

    import exporters
    import models
    from exporters import runtime
    from toolkit.bench import float_twin

    torch.manual_seed(0)
    net = models.create("bireal18", stem="imagenet", num_classes=args.num_classes).eval()
    twin = float_twin(net)
    shape = (3, args.size, args.size)
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        paths, sizes = {}, {}
        for label, _, fmt, kwargs, use_twin in ROWS:
            out = Path(tmp) / f"a{len(paths)}"
            path = exporters.export(
                twin if use_twin else net, out, fmt, input_shape=shape, **kwargs
            )
            paths[label] = path
            model_file = "model.tflite" if fmt == "tflite" else "model.onnx"
            sizes[label] = (path / model_file).stat().st_size
        latency: dict[int, dict[str, float]] = {threads: {} for threads in args.threads}
        groups: dict[str, list[str]] = {}
        for label, baseline, *_ in ROWS:
            groups.setdefault(baseline or label, []).append(label)
        for threads in args.threads:
            for members in groups.values():
                latency[threads].update(
                    _interleaved(
                        {label: runtime.load(paths[label], threads=threads) for label in members},
                        x,
                        args.warmup,
                        args.repeats,
                    )
                )
        resident = {label: memory(str(p))["rss_mb"] for label, p in paths.items()}
    base = sizes["FP32 ONNX (ORT)"]
    print(
        f"\nBi-Real-18 at {shape}, {args.num_classes} classes, batch 1, "
        f"{platform.machine()}, median of {args.repeats}\n"
    )
    header = "| artifact | model file | FP32 ONNX / this |"
    rule = "|---|---|---|"
    for threads in args.threads:
        header += f" ms, {threads} thread{'s' if threads > 1 else ''} | vs baseline |"
        rule += "---|---|"
    print(header + " resident MB |")
    print(rule + "---|")
    for label, baseline, *_ in ROWS:
        line = f"| {label} | {sizes[label] / 1e6:.2f} MB | {base / sizes[label]:.1f}x |"
        for threads in args.threads:
            ms = latency[threads][label]
            ratio = "baseline" if baseline is None else f"{latency[threads][baseline] / ms:.2f}x"
            line += f" {ms:.2f} | {ratio} |"
        print(line + f" {resident[label]:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
