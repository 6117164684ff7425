"""Latency of exported artifacts against the same network in FP32 ONNX, measured fairly.

For one network, :func:`benchmark` exports three artifacts side by side: the fast packed-bit
flavour, the portable flavour, and the FP32 baseline (the same architecture with its quantizers
switched off, exported by ``torch.onnx.export`` and run in stock ONNX Runtime). It then times
``predict`` on one random batch for each, each flavour in a fresh process that loads only it
(so thread pools do not compete), the processes alternated (fast, portable, fp32, fast, ...)
over ``rounds`` so a noisy neighbour slows all three alike. It reports, per thread count, the
median over rounds of each process's median after warm-up, the ratio to FP32, artifact sizes,
and the fast runtime's first-call latency (load + the first ``predict``; the kernels are
native code built at install time, so nothing compiles) and the instruction set its kernels
ran (``kernels_isa``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

import exporters
import models
from exporters import runtime

__all__ = ["BenchResult", "benchmark", "float_twin"]

FLAVOURS = ("onnx", "onnx-portable", "fp32")


@dataclass
class BenchResult:
    """Medians in milliseconds per flavour and thread count, plus sizes and first-call cost."""

    model: str
    input_shape: tuple[int, ...]
    batch: int
    repeats: int
    latency_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    first_call_s: float = 0.0
    load_s: dict[str, float] = field(default_factory=dict)
    per_layer_ms: dict[str, float] = field(default_factory=dict)
    kernels_isa: str = field(default_factory=lambda: _kernels_isa())

    def to_dict(self) -> dict[str, Any]:
        threads = {
            str(t): {
                **{f"{k}_ms": v for k, v in row.items()},
                "speedup_vs_fp32": row["fp32"] / row["onnx"],
                "portable_vs_fp32": row["fp32"] / row["onnx-portable"],
            }
            for t, row in self.latency_ms.items()
        }
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "batch": self.batch,
            "repeats": self.repeats,
            "threads": threads,
            "sizes_bytes": self.sizes,
            "size_ratio_fp32_vs_onnx": self.sizes["fp32"] / self.sizes["onnx"],
            "first_call_s": self.first_call_s,
            "load_s": self.load_s,
            "per_layer_ms": self.per_layer_ms,
            "kernels_isa": self.kernels_isa,
        }


_WORKER = r"""
import json, statistics, sys, time
import numpy as np
from exporters import runtime
path, threads, batch, repeats, warmup = sys.argv[1], *map(int, sys.argv[2:6])
t0 = time.perf_counter()
predictor = runtime.load(path, threads=threads)
load_s = time.perf_counter() - t0
x = np.random.default_rng(0).standard_normal((batch, *predictor.input_shape)).astype(np.float32)
times = []
for rep in range(warmup + repeats):
    t0 = time.perf_counter()
    predictor.predict(x)
    if rep >= warmup:
        times.append(time.perf_counter() - t0)
print(json.dumps({"median_s": statistics.median(times), "load_s": load_s}))
"""


def _time_in_subprocess(
    path: Path, threads: int, batch: int, repeats: int, warmup: int
) -> dict[str, float]:
    """Median ``predict`` time of one artifact in a fresh process that loads only it.

    Separate processes keep one flavour's thread pools (ORT's spinning workers, the kernels'
    pool) from stealing cores from another's; alternating the processes spreads any
    slow phase of a shared machine over every flavour.
    """
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _WORKER,
            str(path),
            str(threads),
            str(batch),
            str(repeats),
            str(warmup),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _kernels_isa() -> str:
    from exporters import kernels

    return kernels.backend()


def float_twin(model: nn.Module) -> nn.Module:
    """The same architecture with every quantizer off (the FP32 baseline), same weights."""
    spec = models.spec_of(model)
    args = dict(spec["args"])
    quantized = [k for k in ("input_quantizer", "kernel_quantizer") if k in args]
    if not quantized:
        return model
    for key in quantized:
        args[key] = None
    twin = models.create(spec["name"], **args)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def benchmark(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    threads: tuple[int, ...] = (1,),
    batch: int = 1,
    repeats: int = 30,
    warmup: int = 3,
    per_layer: bool = False,
    rounds: int = 3,
    workdir: str | Path | None = None,
) -> BenchResult:
    """Export ``model`` three ways and time ``predict`` interleaved; see the module docstring."""
    if repeats < 1 or warmup < 0 or batch < 1:
        raise ValueError("repeats and batch must be >= 1 and warmup >= 0")
    model = model.eval()
    name = models.spec_of(model)["name"]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        paths = {
            "onnx": exporters.export(model, Path(tmp) / "onnx", "onnx", input_shape=input_shape),
            "onnx-portable": exporters.export(
                model, Path(tmp) / "portable", "onnx-portable", input_shape=input_shape
            ),
            "fp32": exporters.export(
                float_twin(model), Path(tmp) / "fp32", "onnx-portable", input_shape=input_shape
            ),
        }
        result = BenchResult(name, tuple(input_shape), batch, repeats)
        result.sizes = {k: (p / "model.onnx").stat().st_size for k, p in paths.items()}
        x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)

        started = time.perf_counter()
        first = runtime.load(paths["onnx"], threads=threads[0])
        first.predict(x)
        result.first_call_s = time.perf_counter() - started

        for count in threads:
            samples: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(rounds):
                for flavour, path in paths.items():
                    timing = _time_in_subprocess(path, count, batch, repeats, warmup)
                    samples[flavour].append(timing["median_s"])
                    result.load_s[f"{flavour}@{count}"] = timing["load_s"]
            result.latency_ms[count] = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        if per_layer:
            fast = runtime.load(paths["onnx"], threads=threads[0])
            profiles = [fast.profile(x) for _ in range(max(3, repeats // 3))]  # type: ignore[attr-defined]
            result.per_layer_ms = {
                step: statistics.median(p[step] for p in profiles) * 1e3 for step in profiles[0]
            }
    return result
