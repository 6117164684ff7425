"""bitfleet's side of the Bi-Real-18 training benchmark (the Larq side is larq_bireal.py).

Trains ``bireal18`` with the ImageNet stem on digits as 32x32x3, batch 64, Adam with peak lr
1e-3 (cosine schedule, bitfleet's default), for ``--epochs`` epochs with ``--threads`` torch
threads, and prints one JSON object shaped like larq_bireal.py's: images/s of every epoch
(training steps only), their median over epochs 2..N (epoch 1 is reported apart, as on the
Larq side, though bitfleet has no graph to trace), and the test accuracy after the last epoch.

    python benchmarks/bireal_train.py --epochs 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from toolkit.train import TrainConfig, train

    load_before = os.getloadavg()[0]
    config = TrainConfig(
        model="bireal18",
        model_args={"stem": "imagenet"},
        dataset="digits",
        channels=3,
        epochs=args.epochs,
        batch_size=64,
        optimizer="adam",
        lr=1e-3,
        seed=args.seed,
        threads=args.threads,
    )
    result = train(config, out=None, progress=False)
    rates = [h["images_per_s"] for h in result.history]
    document = {
        "framework": "bitfleet",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "threads": args.threads,
        "batch": 64,
        "epochs": args.epochs,
        "images_per_s_median": statistics.median(rates[1:] or rates),
        "images_per_s_epochs": rates,
        "first_epoch_s": result.history[0]["seconds"],
        "test_accuracy": result.final["test_accuracy"],
        "test_accuracy_epochs": [h["test_accuracy"] for h in result.history],
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
    }
    json.dump(document, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
