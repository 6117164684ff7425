"""Train the papers' architectures against their baselines on one dataset, several seeds.

Each study is a list of configurations (a registered model and its arguments) trained with the
same recipe (``--epochs`` epochs, batch 64, Adam with peak lr 1e-3, cosine schedule) for every
seed. Every finished run appends one JSON line to ``--out``: study, configuration, seed, test
accuracy, OPs at 224x224 (FLOPs + BOPs/64, 1000 classes), training images/s and seconds. A
rerun skips the (configuration, seed) pairs already in the file, so a long study can stop and
go on. ``--summary`` prints mean +- std per configuration as a Markdown table instead.

    python benchmarks/architecture_study.py sofar --seeds 0 1 2 --out sofar.jsonl
    python benchmarks/architecture_study.py attention --seeds 0 1 2 --out aw.jsonl
    python benchmarks/architecture_study.py sofar --out sofar.jsonl --summary
    python benchmarks/architecture_study.py sofar --dataset cifar10 \
        --data-root path/to/cifar-10-batches-bin --epochs 100 --out sofar_cifar.jsonl

Studies:

- ``sofar``: Bi-Real-18 vs ``sofar_rf``, BinaryDenseNet-28 vs ``sofar_drf`` (the SoFAr defaults
  match their baselines' OPs at 224x224 within 5%).
- ``attention``: ResNet-18 and Bi-Real-18, each with attention none / se / aw / se+aw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STEM = {"stem": "imagenet"}  # 32x32 inputs downsampled at once, as the digits benchmarks do

STUDIES: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "sofar": {
        "bireal18": ("bireal18", STEM),
        "sofar_rf": ("sofar_rf", STEM),
        "binarydensenet28": ("binarydensenet28", STEM),
        "sofar_drf": ("sofar_drf", STEM),
    },
    "attention": {
        f"{model}+{attention}": (model, {**STEM, "attention": attention})
        for model in ("resnet18", "bireal18")
        for attention in ("none", "se", "aw", "se+aw")
    },
}


def ops_224(model: str, model_args: dict[str, Any]) -> float:
    """OPs of a configuration at 224x224 with 1000 classes (the papers' measure)."""
    import models

    net = models.create(model, **{**model_args, "num_classes": 1000})
    return float(models.count_ops(net, (1, 3, 224, 224)).ops)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a study file (none when it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one finished run, so a stopped study loses nothing it finished."""
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def _done(path: Path) -> set[tuple[str, int]]:
    return {(row["config"], row["seed"]) for row in read_rows(path)}


def run(study: str, args: argparse.Namespace) -> None:
    configs = STUDIES[study]
    if args.configs:
        unknown = sorted(set(args.configs) - set(configs))
        if unknown:
            raise SystemExit(
                f"error: {study} has no configuration {', '.join(unknown)}; "
                f"it has {', '.join(configs)}"
            )
        configs = {name: configs[name] for name in args.configs}
    run_configs(study, configs, args)


def run_configs(
    study: str, configs: dict[str, tuple[str, dict[str, Any]]], args: argparse.Namespace
) -> None:
    """Train every configuration for every seed of ``args.seeds`` not yet in ``args.out``.

    ``args`` carries ``out``, ``seeds``, ``dataset``, ``epochs`` and ``threads``.
    """
    from toolkit.train import TrainConfig, train

    done = _done(args.out)
    for config_name, (model, model_args) in configs.items():
        ops = ops_224(model, model_args)
        for seed in args.seeds:
            if (config_name, seed) in done:
                continue
            config = TrainConfig(
                model=model,
                model_args=model_args,
                dataset=args.dataset,
                data_root=getattr(args, "data_root", None),
                channels=3,
                epochs=args.epochs,
                batch_size=64,
                lr=1e-3,
                seed=seed,
                threads=args.threads,
            )
            started = time.perf_counter()
            result = train(config, progress=False)
            row = {
                "study": study,
                "config": config_name,
                "model": model,
                "model_args": model_args,
                "dataset": args.dataset,
                "epochs": args.epochs,
                "seed": seed,
                "accuracy": result.final["test_accuracy"],
                "ops_224": ops,
                "images_per_s": statistics.median(h["images_per_s"] for h in result.history),
                "seconds": round(time.perf_counter() - started, 1),
                "threads": args.threads,
            }
            append_row(args.out, row)
            print(f"{config_name} seed {seed}: {row['accuracy']:.4f}", file=sys.stderr)


def summary(path: Path) -> str:
    rows = read_rows(path)
    by_config: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_config.setdefault(row["config"], []).append(row)
    lines = [
        "| configuration | OPs at 224 | seeds | accuracy mean +- std | train images/s |",
        "|---|---|---|---|---|",
    ]
    for name, runs in by_config.items():
        accuracy = [r["accuracy"] for r in runs]
        spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
        rate = statistics.median(r["images_per_s"] for r in runs)
        lines.append(
            f"| {name} | {runs[0]['ops_224'] / 1e8:.2f}e8 | {len(runs)} | "
            f"{statistics.mean(accuracy):.3f} +- {spread:.3f} | {rate:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--dataset", default="digits-hard")
    ap.add_argument("--data-root", help="folder of the dataset's files (cifar10, mnist, ...)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--configs", nargs="+", help="only these configurations (split a study across jobs)"
    )
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, appended to")
    ap.add_argument("--summary", action="store_true", help="print the table of --out and stop")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(args.out))
        return 0
    run(args.study, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
