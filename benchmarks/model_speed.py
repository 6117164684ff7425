"""Training images/s of the binary model families, interleaved, median of repeats.

Each repeat trains every model for ``--steps`` optimizer steps (after ``--warmup`` steps that
are not timed) through :func:`models.training.train_steps`, the step the trainer, the
simulator and the agent use (Adam, latent-weight clipping), on random batches shaped like the
digits benchmark (``--size`` x ``--size`` x 3, batch ``--batch``). Models take turns within a
repeat, and the order rotates from repeat to repeat, so drifting load on a shared machine hits
them all alike. Prints one JSON document: per model the median images/s, every repeat's
figure, the ratio to the first model (``bireal18`` by default) and OPs at 224x224.

    OMP_NUM_THREADS=2 python benchmarks/model_speed.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

DEFAULT_MODELS = ["bireal18", "sofar_rf", "binarydensenet28", "binarydensenet37", "sofar_drf"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stem", default="imagenet", choices=["imagenet", "cifar"])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--width", type=float, default=None, help="width for every model (tests)")
    ap.add_argument("--no-ops", action="store_true", help="skip the OPs count at 224x224")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    import models
    from models.training import make_optimizer, train_steps

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    extra = {} if args.width is None else {"width": args.width}
    nets = {name: models.create(name, stem=args.stem, **extra) for name in args.models}
    optimizers = {name: make_optimizer(net, "adam", 1e-3) for name, net in nets.items()}
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))

    def run(name: str, steps: int) -> float:
        start = time.perf_counter()
        train_steps(nets[name], optimizers[name], iter([(x, y)] * steps))
        return time.perf_counter() - start

    for name in args.models:
        run(name, args.warmup)
    rates: dict[str, list[float]] = {name: [] for name in args.models}
    load_before = os.getloadavg()[0]
    for repeat in range(args.repeats):
        shift = repeat % len(args.models)
        for name in args.models[shift:] + args.models[:shift]:
            rates[name].append(args.batch * args.steps / run(name, args.steps))
    load_after = os.getloadavg()[0]

    base = statistics.median(rates[args.models[0]])
    results = {}
    for name in args.models:
        median = statistics.median(rates[name])
        row: dict[str, object] = {
            "images_per_s_median": round(median, 1),
            "images_per_s_repeats": [round(r, 1) for r in rates[name]],
            f"ratio_to_{args.models[0]}": round(median / base, 3),
        }
        if not args.no_ops:
            big = models.create(name, stem="imagenet", num_classes=1000, **extra)
            count = models.count_ops(big, (1, 3, 224, 224))
            row["ops_224"] = count.ops
            row["flops_224"] = count.flops
            row["bops_224"] = count.bops
        results[name] = row
    document = {
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "threads": args.threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "stem": args.stem,
        "input": [3, args.size, args.size],
        "batch": args.batch,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "loadavg_1min_before_after": [load_before, load_after],
        "models": results,
    }
    json.dump(document, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
