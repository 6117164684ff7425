"""digits-hard: generation time, and Bi-Real-18 vs float ResNet-18 after the default recipe.

Measures, in one process and in this order:

1. generation: the training set and the fixed test set generated from scratch (no cache), then
   the same sets read back from the safetensors cache, then ``load_dataset`` (cache read,
   uint8 -> float, normalisation) as ``bitfleet train`` calls it;
2. training: each model with the project's default recipe (``bitfleet train``'s defaults:
   8 epochs, batch 64, Adam, peak lr 1e-3, cosine, seed 0), the ImageNet stem on 32x32x3, as
   the digits benchmarks train Bi-Real-18. Test accuracy after every epoch, the
   seconds of each epoch's training steps, and the wall time of each run (evaluation included).

Prints one JSON document on stdout (progress on stderr). The dataset's targets: Bi-Real-18 between
0.60 and 0.85 after 8 epochs, float ResNet-18 at least 5 points above it.

    OMP_NUM_THREADS=2 python benchmarks/digits_hard.py --threads 2 > digits_hard.json
    python benchmarks/digits_hard.py --n 2000 --epochs 1 --models lenet5   # a smoke run

``--knobs '{"noise": 0.12}'`` trains on a set generated with other difficulty knobs (a tuning
aid: the data then bypasses ``load_dataset``'s defaults, with the same normalisation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESNETS = {"bireal18", "resnet18", "resnet34", "bireal34"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dataset_name(n: int, seed: int) -> str:
    """``digits-hard`` itself (what `bitfleet train --dataset digits-hard` loads) when it can."""
    from toolkit import digits_hard as dh

    if n == dh.DEFAULT_TRAIN_SIZE and seed == dh.DEFAULT_SEED:
        return "digits-hard"
    return f"digits-hard:n={n},seed={seed}"


def measure_generation(n: int, seed: int, knobs: Any) -> dict[str, float]:
    from toolkit import digits_hard as dh
    from toolkit.data import load_dataset

    timings: dict[str, float] = {}
    for split, count in (("train", n), ("test", dh.TEST_SIZE)):
        started = time.perf_counter()
        dh.generate(split, count, seed, knobs)
        timings[f"generate_{split}_s"] = time.perf_counter() - started
        dh.load(split, count, seed, knobs)  # writes the cache if it is not there yet
        started = time.perf_counter()
        dh.load(split, count, seed, knobs)
        timings[f"cached_{split}_s"] = time.perf_counter() - started
    if knobs == dh.DIFFICULTY:
        started = time.perf_counter()
        load_dataset(dataset_name(n, seed), "train")
        load_dataset(dataset_name(n, seed), "test")
        timings["load_dataset_train_and_test_s"] = time.perf_counter() - started
    return {k: round(v, 3) for k, v in timings.items()}


def datasets_with_knobs(n: int, seed: int, knobs: Any) -> tuple[Any, Any]:
    """Train and test ArrayDatasets of non-default knobs, normalised as load_dataset does."""
    import numpy as np

    from toolkit import digits_hard as dh
    from toolkit.data import ArrayDataset, _channel_stats, _normalise

    train, test = dh.load("train", n, seed, knobs), dh.load("test", None, seed, knobs)
    x_train = train.x.astype(np.float32) / 255.0
    x_test = test.x.astype(np.float32) / 255.0
    mean, std = _channel_stats(x_train)

    def wrap(x: Any, y: Any) -> ArrayDataset:
        return ArrayDataset(
            "digits-hard",
            _normalise(x, mean, std),
            y,
            dh.CLASSES,
            tuple(float(v) for v in mean),
            tuple(float(v) for v in std),
        )

    return wrap(x_train, train.y), wrap(x_test, test.y)


def train_one(
    model: str, n: int, seed: int, epochs: int, threads: int, data: tuple[Any, Any] | None
) -> dict[str, Any]:
    from toolkit.train import TrainConfig, train

    config = TrainConfig(
        model=model,
        model_args={"stem": "imagenet"} if model in RESNETS else {},
        dataset=dataset_name(n, seed),
        channels=3,
        epochs=epochs,
        threads=threads,
    )
    started = time.perf_counter()
    train_data, test_data = data if data is not None else (None, None)
    result = train(config, progress=False, train_data=train_data, test_data=test_data)
    wall = time.perf_counter() - started
    history = result.history
    for record in history:
        log(
            f"{model} epoch {record['epoch']:.0f}: test {record['test_accuracy']:.4f}, "
            f"train {record['train_accuracy']:.4f}, {record['seconds']:.1f} s"
        )
    return {
        "model_args": config.model_args,
        "test_accuracy": history[-1]["test_accuracy"],
        "train_accuracy": history[-1]["train_accuracy"],
        "accuracy_per_epoch": [round(h["test_accuracy"], 4) for h in history],
        "epoch_train_seconds": [round(h["seconds"], 1) for h in history],
        "images_per_s": round(sorted(h["images_per_s"] for h in history)[len(history) // 2]),
        "wall_seconds": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="training images (default: the loader's)")
    ap.add_argument("--seed", type=int, default=0, help="the data's seed (training uses seed 0)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=["bireal18", "resnet18"])
    ap.add_argument("--knobs", default="{}", help="JSON of Difficulty fields to override")
    args = ap.parse_args(argv)

    import torch

    from toolkit import digits_hard as dh

    n = dh.DEFAULT_TRAIN_SIZE if args.n is None else args.n
    knobs = dataclasses.replace(dh.DIFFICULTY, **json.loads(args.knobs))
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "machine": {
            "cpu": cpu_name(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "data": {
            "n_train": n,
            "n_test": dh.TEST_SIZE,
            "seed": args.seed,
            "generator_version": dh.GENERATOR_VERSION,
            "knobs": dataclasses.asdict(knobs),
        },
    }
    log(f"generating {n} + {dh.TEST_SIZE} images ...")
    report["generation"] = measure_generation(n, args.seed, knobs)
    log(json.dumps(report["generation"]))
    data = None if knobs == dh.DIFFICULTY else datasets_with_knobs(n, args.seed, knobs)
    report["models"] = {
        model: train_one(model, n, args.seed, args.epochs, args.threads, data)
        for model in args.models
    }
    accuracies = {m: r["test_accuracy"] for m, r in report["models"].items()}
    if {"bireal18", "resnet18"} <= accuracies.keys():
        report["targets"] = {
            "bireal18_in_0.60_0.85": 0.60 <= accuracies["bireal18"] <= 0.85,
            "resnet18_minus_bireal18": round(accuracies["resnet18"] - accuracies["bireal18"], 4),
            "resnet18_at_least_5_points_above": accuracies["resnet18"]
            >= accuracies["bireal18"] + 0.05,
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
