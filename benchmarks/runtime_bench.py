"""Whole-model latency, artifact sizes and memory of the exported flavours.

Bi-Real-18 (ImageNet stem, 1000 classes, 224x224, random weights: speed does not depend on
them) is exported as the fast ``onnx`` flavour, the ``onnx-portable`` flavour and FP32 ONNX of
the same network (quantizers off). Latency: ``predict`` at batch 1, interleaved, median of
``--repeats`` after warm-up, for each thread count. Memory: for each flavour, a fresh Python
process imports the runtime, loads the artifact, runs one ``predict`` and reports its resident
set (VmRSS) and peak (VmHWM), whether torch was loaded, and the instruction set the native
kernels run (``kernels_isa``: avx512, avx2, neon_dotprod, neon, scalar, or numpy without the
library); the baseline row is the same process before loading anything.

    python benchmarks/runtime_bench.py --threads 1 2 --repeats 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_MEMORY_PROBE = r"""
import sys, json
def rss():
    fields = dict(line.split(':', 1) for line in open('/proc/self/status'))
    return {k: int(fields[k].split()[0]) / 1024 for k in ('VmRSS', 'VmHWM')}
import numpy as np
from exporters import runtime
before = rss()
path = sys.argv[1]
if path != '-':
    p = runtime.load(path, threads=1)
    p.predict(np.zeros((1, *p.input_shape), np.float32))
after = rss()
from exporters import kernels
print(json.dumps({'before_mb': before['VmRSS'], 'rss_mb': after['VmRSS'], 'peak_mb': after['VmHWM'],
                  'torch_loaded': 'torch' in sys.modules, 'kernels_isa': kernels.backend()}))
"""


def memory(path: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, path],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=1000)
    args = ap.parse_args(argv)

    import torch

    import exporters
    import models
    from toolkit.bench import benchmark, float_twin

    torch.manual_seed(0)
    net = models.create("bireal18", stem="imagenet", num_classes=args.num_classes).eval()
    shape = (3, args.size, args.size)
    result = benchmark(
        net,
        shape,
        threads=tuple(args.threads),
        repeats=args.repeats,
        warmup=args.warmup,
        per_layer=True,
    ).to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            "onnx": exporters.export(net, Path(tmp) / "f", "onnx", input_shape=shape),
            "onnx-portable": exporters.export(
                net, Path(tmp) / "p", "onnx-portable", input_shape=shape
            ),
            "fp32": exporters.export(
                float_twin(net), Path(tmp) / "x", "onnx-portable", input_shape=shape
            ),
        }
        result["memory"] = {"baseline (imports only)": memory("-")}
        result["memory"].update({k: memory(str(p)) for k, p in paths.items()})
    result["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
