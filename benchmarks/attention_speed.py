"""Training-step time of Bi-Real-18 with and without attention, interleaved, median of repeats.

The AW-convolution issue bounds the cost of AW's grouped-convolution path: at most 2x the plain
network's training step. Each repeat times ``--steps`` optimizer steps of every variant through
:func:`models.training.train_steps` (the trainer's step: Adam, latent-weight clipping) on one
random batch, after ``--warmup`` untimed steps; the variants take turns and the order rotates
from repeat to repeat, so drifting load on a shared machine hits them alike. ``--layers`` adds
one binary 3x3 conv per stage shape (forward + backward), plain against AW, which shows where
the cost goes. Prints one JSON document.

    OMP_NUM_THREADS=2 python benchmarks/attention_speed.py --width 0.5 --size 32 --repeats 5
    OMP_NUM_THREADS=1 python benchmarks/attention_speed.py --width 1 --stem imagenet --threads 1 \
        --attention none se aw aw@grouped --steps 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

DEFAULT_ATTENTIONS = ["none", "aw"]


def _interleaved(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run per repeat, the order rotating from repeat to repeat."""
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(runs[name]())
    return seconds


def _conv_runner(conv: Any, inp: Any, steps: int) -> Callable[[], float]:
    """Seconds per forward + backward of ``conv`` on ``inp``."""

    def run() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            conv(inp).sum().backward()
        return (time.perf_counter() - start) / steps

    return run


def _network(models: Any, args: argparse.Namespace, name: str) -> Any:
    """The benchmarked network for an attention name; ``aw@grouped`` forces the grouped path."""
    from models.attention import AWConv2d

    attention, _, path = name.partition("@")
    net = models.create(args.model, width=args.width, stem=args.stem, attention=attention)
    if path == "grouped":
        for module in net.modules():
            if isinstance(module, AWConv2d):
                module.factored_below = 0
    elif path:
        raise SystemExit(f"error: unknown AW path {path!r} in {name!r}; use aw@grouped")
    return net


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bireal18")
    ap.add_argument("--attention", nargs="+", default=DEFAULT_ATTENTIONS)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", action="store_true", help="also time one conv per stage shape")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    import models
    from models.attention import AWConv2d
    from models.layers import BinaryConv2d
    from models.training import make_optimizer, train_steps

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    nets = {a: _network(models, args, a) for a in args.attention}
    optimizers = {a: make_optimizer(net, "adam", 1e-3) for a, net in nets.items()}
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))

    def step_runner(attention: str) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            train_steps(nets[attention], optimizers[attention], iter([(x, y)] * args.steps))
            return (time.perf_counter() - start) / args.steps

        return run

    runs = {a: step_runner(a) for a in args.attention}
    for run in runs.values():  # warm-up, untimed
        for _ in range(args.warmup):
            run()
    load_before = os.getloadavg()[0]
    seconds = _interleaved(runs, args.repeats)
    base = statistics.median(seconds[args.attention[0]])
    variants = {
        a: {
            "step_ms_median": round(1000 * statistics.median(s), 1),
            "step_ms_repeats": [round(1000 * v, 1) for v in s],
            f"ratio_to_{args.attention[0]}": round(statistics.median(s) / base, 2),
            "images_per_s": round(args.batch / statistics.median(s), 1),
        }
        for a, s in seconds.items()
    }

    layers = {}
    if args.layers:
        size = args.size if args.stem == "cifar" else args.size // 4
        for stage, base_width in enumerate((64, 128, 256, 512)):
            channels = max(1, round(base_width * args.width))
            side = max(1, size >> stage)
            inp = torch.randn(args.batch, channels, side, side, requires_grad=True)
            convs = {
                name: cls(
                    channels,
                    channels,
                    3,
                    padding=1,
                    bias=False,
                    input_quantizer="approx_sign",
                    kernel_quantizer="magnitude_aware_sign",
                )
                for name, cls in (("plain", BinaryConv2d), ("aw", AWConv2d))
            }
            conv_runs = {name: _conv_runner(conv, inp, args.steps) for name, conv in convs.items()}
            for run in conv_runs.values():
                run()
            timed = _interleaved(conv_runs, args.repeats)
            plain, aw = (statistics.median(timed[n]) for n in ("plain", "aw"))
            layers[f"{channels}ch_{side}x{side}"] = {
                "plain_ms": round(1000 * plain, 2),
                "aw_ms": round(1000 * aw, 2),
                "ratio": round(aw / plain, 2),
            }
    load_after = os.getloadavg()[0]

    document = {
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "model": args.model,
        "width": args.width,
        "stem": args.stem,
        "input": [3, args.size, args.size],
        "batch": args.batch,
        "threads": args.threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "steps_per_repeat": args.steps,
        "warmup_steps": args.warmup,
        "repeats": args.repeats,
        "loadavg_1min_before_after": [load_before, load_after],
        "training_step": variants,
        "layers_forward_backward": layers,
    }
    json.dump(document, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
