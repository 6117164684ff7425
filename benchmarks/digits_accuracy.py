"""Digits test accuracy after a fixed budget, for float ResNet-18, Bi-Real-18 and LeNet-5.

Budget: ``--epochs`` epochs (default 8), batch 64, Adam with peak lr 1e-3 and a cosine
schedule, over ``--seeds`` seeds. The ResNets use the ImageNet stem on 32x32x3 inputs (gray
replicated), as in the Larq comparison; LeNet-5 takes the 32x32x1 images. Prints one JSON
object: per model, accuracy per seed, mean, min, max, and training images/s.

    python benchmarks/digits_accuracy.py --epochs 8 --seeds 0 1 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

MODELS = {
    "resnet18": ({"stem": "imagenet"}, 3),
    "bireal18": ({"stem": "imagenet"}, 3),
    "lenet5": ({}, None),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from toolkit.train import TrainConfig, train

    report: dict[str, dict] = {}
    for name, (model_args, channels) in MODELS.items():
        accuracies, rates = [], []
        for seed in args.seeds:
            config = TrainConfig(
                model=name,
                model_args=model_args,
                channels=channels,
                epochs=args.epochs,
                batch_size=64,
                lr=1e-3,
                seed=seed,
                threads=args.threads,
            )
            result = train(config, progress=False)
            accuracies.append(result.final["test_accuracy"])
            rates.append(statistics.median(h["images_per_s"] for h in result.history))
            print(f"{name} seed {seed}: {accuracies[-1]:.4f}", file=sys.stderr)
        report[name] = {
            "model_args": model_args,
            "accuracy_per_seed": accuracies,
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_min": min(accuracies),
            "accuracy_max": max(accuracies),
            "images_per_s": statistics.median(rates),
        }
    print(
        json.dumps(
            {"epochs": args.epochs, "seeds": args.seeds, "threads": args.threads, "models": report},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
