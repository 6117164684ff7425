"""Artifact size and CPU latency of every ONNX format, with float parts in fp32 and int8.

Bi-Real-18 (ImageNet stem, 1000 classes, 224x224, random weights: sizes and speed do not
depend on them) is exported in the fast ``onnx``, ``onnx-portable`` and ``onnx-trt`` formats,
each with ``float_parts`` fp32 and int8, next to FP32 ONNX of the same network (quantizers
off). For each artifact: the model file's size, the ratio FP32 / this, ``predict`` latency at
batch 1 in this process (median of ``--repeats`` after warm-up; ``onnx-trt`` runs in stock
ONNX Runtime here, its target is TensorRT), and how far the int8 float parts move the logits
from the fp32 ones (max difference over the logits' scale, argmax agreement on random inputs).
With ``--checkpoint RUN`` it also reports the accuracy of both float parts on the digits
test split (the checkpoint must be trained on digits).

    python benchmarks/formats_bench.py --threads 1 --repeats 20
    python benchmarks/formats_bench.py --checkpoint runs/bireal --size 32 --num-classes 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--checkpoint", type=Path, default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch

    import exporters
    import models
    from exporters import runtime
    from toolkit.bench import float_twin

    torch.manual_seed(0)
    if args.checkpoint is not None:
        from models.checkpoint import load as load_checkpoint

        net = load_checkpoint(args.checkpoint).model.eval()
    else:
        net = models.create("bireal18", stem="imagenet", num_classes=args.num_classes).eval()
    shape = (3, args.size, args.size)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, *shape)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = exporters.export(
            float_twin(net), Path(tmp) / "fp32", "onnx-portable", input_shape=shape
        )
        base = (fp32 / "model.onnx").stat().st_size
        rows.append(
            (
                "FP32 ONNX",
                "-",
                base,
                _latency(runtime.load(fp32, args.threads), x, args.repeats),
                None,
            )
        )
        for fmt in ("onnx", "onnx-portable", "onnx-trt"):
            reference = None
            for parts in ("fp32", "int8"):
                path = exporters.export(
                    net, Path(tmp) / f"{fmt}-{parts}", fmt, input_shape=shape, float_parts=parts
                )
                predictor = runtime.load(path, args.threads)
                logits = predictor.predict(x)
                moved = None
                if reference is None:
                    reference = logits
                else:
                    scale = np.abs(reference).max()
                    moved = (
                        float(np.abs(logits - reference).max() / scale),
                        float((logits.argmax(1) == reference.argmax(1)).mean()),
                    )
                size = (path / "model.onnx").stat().st_size
                rows.append((fmt, parts, size, _latency(predictor, x, args.repeats), moved))
                if args.checkpoint is not None and fmt == "onnx":
                    print(f"digits accuracy, float parts {parts}: {_accuracy(predictor):.4f}")
    print(f"\nBi-Real-18 at {shape}, {args.num_classes} classes, {args.threads} thread(s)\n")
    print("| format | float parts | model file | FP32 / this | predict ms | int8 vs fp32 logits |")
    print("|---|---|---|---|---|---|")
    for fmt, parts, size, ms, moved in rows:
        change = "" if moved is None else f"max {moved[0]:.1e} of scale, argmax {moved[1]:.0%}"
        print(
            f"| {fmt} | {parts} | {size / 1e6:.2f} MB | {base / size:.1f}x | {ms:.2f} | {change} |"
        )
    return 0


def _latency(predictor, x: np.ndarray, repeats: int) -> float:
    one = x[:1]
    for _ in range(3):
        predictor.predict(one)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.predict(one)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def _accuracy(predictor) -> float:
    from toolkit.data import load_dataset

    data = load_dataset("digits", "test", channels=predictor.input_shape[0])
    return float((predictor.predict(data.x).argmax(1) == data.y).mean())


if __name__ == "__main__":
    raise SystemExit(main())
