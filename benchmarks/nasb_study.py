"""NASB's claim against its baselines: a searched cell vs hand-designed nets and random cells.

Every network is trained with :mod:`benchmarks.architecture_study`'s recipe (``--epochs``
epochs, batch 64, Adam 1e-3, cosine) on the same dataset, and NASB networks are held to the
baselines' cost: ``channels`` is chosen per genotype so that its OPs at 224x224 (ImageNet stem,
1000 classes) come within 5% of ``--target-ops``. Three steps, each resumable (JSON lines,
appended to; a rerun skips what is done):

1. ``random-search``: the honest NAS baseline with the search's compute. Random genotypes
   (:func:`models.nasb.random_genotype`, seeds 0, 1, 2, ...) are trained ``--proxy-epochs`` on
   the search's weights half of the training images and scored on its alphas half (the split
   of :func:`toolkit.search.run.split_halves`, the search's ``--seed``), until the wall time
   spent reaches ``--budget-s`` (the search's own time: ``history[*].seconds`` of its
   ``search.json``, with ``--search-dir``).
2. ``train``: the full recipe, every seed, for ``nasb_a`` (the shipped genotype), the random
   search's best (by its held-out score), and the first ``--random K`` random genotypes
   (``rand_<i>``, the random search's first K draws) on the first seed, then the best of them
   (by that seed's test accuracy, which favours the baseline) on every seed.
3. ``--summary``: mean +- std per network, with the baselines' rows of another study file
   (``--baselines``, e.g. Bi-Real-18 and ``sofar_rf`` from the SoFAr study, same recipe).

    python benchmarks/nasb_study.py random-search --search-dir runs/search --out nasb_rs.jsonl
    python benchmarks/nasb_study.py train --random-search nasb_rs.jsonl --out nasb.jsonl
    python benchmarks/nasb_study.py summary --out nasb.jsonl --baselines sofar.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.architecture_study import (
    STEM,
    append_row,
    ops_224,
    read_rows,
    run_configs,
    summary,
)

TARGET_OPS = 163_985_408.0
"""Bi-Real-18's OPs at 224x224 (ImageNet stem, 1000 classes): the cost every network is held to."""


def matched_args(genotype: dict[str, Any], target_ops: float) -> dict[str, Any]:
    """``models.create("nasb", **args)`` arguments whose OPs at 224x224 are within 5% of target."""
    from models.fractal import width_for_ops

    channels = width_for_ops(
        "nasb",
        target_ops,
        param="channels",
        values=range(2, 129),
        stem="imagenet",
        num_classes=1000,
        genotype=genotype,
    )
    return {"genotype": genotype, "channels": int(channels), **STEM}


def search_seconds(search_dir: Path) -> float:
    """Wall seconds of a finished search: the sum of its epochs' times in ``search.json``."""
    history = json.loads((search_dir / "search.json").read_text())["history"]
    return float(sum(epoch["seconds"] for epoch in history))


def random_search(args: argparse.Namespace) -> None:
    import torch

    import models
    from models.nasb import random_genotype
    from models.training import BatchSampler, cosine_schedule, evaluate, make_optimizer, train_steps
    from toolkit.data import load_dataset
    from toolkit.search.run import split_halves

    budget = args.budget_s if args.budget_s is not None else search_seconds(args.search_dir)
    rows = read_rows(args.out)
    spent = sum(row["seconds"] for row in rows)
    torch.set_num_threads(args.threads)
    # three channels, as the studies train
    data = load_dataset(args.dataset, "train", root=args.data_root, channels=3)
    weights_half, held_out = split_halves(len(data), args.search_seed)
    sampler = BatchSampler(data.x, data.y, 64, weights_half)
    steps_per_epoch = -(-len(weights_half) // 64)
    index = len(rows)
    while spent < budget:
        started = time.perf_counter()
        genotype = random_genotype(index).to_dict()
        model_args = matched_args(genotype, args.target_ops)
        torch.manual_seed(index)
        net = models.create("nasb", **model_args, num_classes=data.num_classes)
        optimizer = make_optimizer(net, "adam", 1e-3)
        for epoch in range(args.proxy_epochs):
            lr_at = cosine_schedule(1e-3, epoch, args.proxy_epochs, steps_per_epoch)
            train_steps(net, optimizer, sampler.epoch(index, epoch), lr_at=lr_at)
        score = evaluate(net, data.x[held_out], data.y[held_out])["accuracy"]
        seconds = time.perf_counter() - started
        spent += seconds
        row = {
            "index": index,
            "genotype": genotype,
            "channels": model_args["channels"],
            "ops_224": ops_224("nasb", model_args),
            "held_out_accuracy": score,
            "proxy_epochs": args.proxy_epochs,
            "seconds": round(seconds, 1),
            "spent": round(spent, 1),
            "budget_s": round(budget, 1),
            "threads": args.threads,
        }
        append_row(args.out, row)
        print(f"random {index}: held-out {score:.4f} ({spent:.0f}/{budget:.0f} s)", file=sys.stderr)
        index += 1


def train_study(args: argparse.Namespace) -> None:
    from models.nasb import random_genotype

    configs: dict[str, tuple[str, dict[str, Any]]] = {"nasb_a": ("nasb_a", STEM)}
    if args.random_search is not None:
        scored = read_rows(args.random_search)
        if not scored:
            raise SystemExit(f"error: {args.random_search} holds no random-search rows")
        best = max(scored, key=lambda row: row["held_out_accuracy"])
        configs["random_search"] = ("nasb", matched_args(best["genotype"], args.target_ops))
    for index in range(args.random):
        genotype = random_genotype(index).to_dict()
        configs[f"rand_{index}"] = ("nasb", matched_args(genotype, args.target_ops))
    draws = {name: config for name, config in configs.items() if _is_draw(name)}
    run_configs("nasb", {k: v for k, v in configs.items() if k not in draws}, args)
    # the K draws once (seed 0), then the best of them on every seed
    run_configs("nasb", draws, argparse.Namespace(**{**vars(args), "seeds": args.seeds[:1]}))
    best_draw = best_of_random(read_rows(args.out), args.seeds[0])
    if best_draw is not None:
        run_configs("nasb", {best_draw: draws[best_draw]}, args)


def _is_draw(config: str) -> bool:
    """Whether a configuration is one of the K random genotypes (``rand_<i>``)."""
    return config.startswith("rand_")


def best_of_random(rows: list[dict[str, Any]], seed: int = 0) -> str | None:
    """The ``rand_<i>`` configuration with the best test accuracy on ``seed``, or None."""
    firsts = [r for r in rows if _is_draw(r["config"]) and r["seed"] == seed]
    return max(firsts, key=lambda r: r["accuracy"])["config"] if firsts else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["random-search", "train", "summary"])
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, appended to")
    ap.add_argument("--dataset", default="digits-hard")
    ap.add_argument("--data-root", help="folder of the dataset's files (cifar10, mnist, ...)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-ops", type=float, default=TARGET_OPS)
    ap.add_argument("--search-dir", type=Path, help="finished search: its time is the budget")
    ap.add_argument("--search-seed", type=int, default=0, help="the search's --seed (its split)")
    ap.add_argument(
        "--budget-s", type=float, help="random search's wall seconds (default: the search's)"
    )
    ap.add_argument(
        "--proxy-epochs", type=int, default=3, help="epochs per random cell (1 scores near chance)"
    )
    ap.add_argument("--random-search", type=Path, help="random-search rows: train its best")
    ap.add_argument("--random", type=int, default=3, help="K random genotypes to train")
    ap.add_argument("--baselines", type=Path, nargs="*", default=[], help="other studies' rows")
    args = ap.parse_args(argv)
    if args.step == "random-search":
        if args.budget_s is None and args.search_dir is None:
            ap.error("random-search needs --search-dir or --budget-s")
        random_search(args)
    elif args.step == "train":
        train_study(args)
    else:
        rows = [r for path in args.baselines for r in read_rows(path)] + read_rows(args.out)
        merged = args.out.with_suffix(".summary.jsonl")
        merged.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(summary(merged))
        best = best_of_random(rows)
        if best is not None:
            accuracy = [r["accuracy"] for r in rows if r["config"] == best]
            spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
            print(
                f"\nbest of the random genotypes (by seed 0): {best}, "
                f"{statistics.mean(accuracy):.3f} +- {spread:.3f} over {len(accuracy)} seeds"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
