"""Data-free compression study: real data vs GDFQ vs ZeroQ vs AutoReCon, int4 and binary students.

For one float teacher checkpoint, every (student, source, seed) run distils a student with the
same budget (``--steps`` distillation steps, batch 64, KL at T = 20 plus the int students'
BN-statistics term) and reports its accuracy on the teacher's real test split:

- ``real``: the student distilled on the teacher's real training images (the upper bound), by
  :func:`toolkit.datafree.distill`, the function a compression uses;
- ``gdfq``, ``zeroq``, ``autorecon``: a full :func:`toolkit.datafree.compress` run with that
  source, which never reads the training images;
- ``random``: the search's control, an AutoReCon run whose generator is drawn at random from
  the same space (:func:`toolkit.datafree.autorecon.random_genotype`, seeded by the run's
  seed) instead of searched, then retrained and distilled exactly as a searched one.

Runs are appended as JSON lines (a rerun skips what is done), so a study can be split across
jobs (``--students``, ``--sources``, ``--seeds``) and stopped at any time.

    python benchmarks/autorecon_study.py run --teacher runs/teacher --out autorecon.jsonl
    python benchmarks/autorecon_study.py summary --out autorecon.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.architecture_study import append_row, read_rows  # noqa: E402

SOURCES = ("real", "gdfq", "zeroq", "autorecon", "random")
STUDENTS = ("int4", "bireal18", "int8")


def _done(path: Path, teacher: str) -> set[tuple[str, str, int]]:
    return {
        (row["student"], row["source"], row["seed"])
        for row in read_rows(path)
        if row["teacher"] == teacher
    }


def _teacher_split(meta: dict[str, Any], split: str) -> Any:
    """A split of the data the teacher's metadata names, shaped as the teacher was trained."""
    from toolkit.data import load_dataset

    return load_dataset(
        meta["dataset"],
        split,
        root=meta.get("data_root"),
        channels=meta.get("channels"),
        image_size=meta.get("image_size"),
    )


def _real_run(config: Any) -> tuple[Any, dict[str, Any]]:
    """Distil the student on the teacher's real training images (the upper bound)."""
    import numpy as np

    from models import checkpoint
    from models.training import BatchSampler, freeze
    from toolkit.datafree import distill, make_student

    loaded = checkpoint.load(config.teacher)
    teacher, train = freeze(loaded.model), _teacher_split(loaded.meta, "train")
    student = make_student(config.to, teacher)
    sampler = BatchSampler(train.x, train.y, config.batch_size)
    batches = sampler.endless(np.random.default_rng(config.seed))
    distill(config, teacher, student, batches)
    return student, {}


def _compress_run(config: Any) -> tuple[Any, dict[str, Any]]:
    from models import checkpoint
    from toolkit.datafree import compress

    with tempfile.TemporaryDirectory() as tmp:
        result = compress(config, Path(tmp) / "student", progress=False)
        student = checkpoint.load(Path(tmp) / "student").model
    return student, {"genotype": result.genotype, "phase_seconds": result.seconds}


def run(args: argparse.Namespace) -> None:
    import torch

    from toolkit.datafree import CompressConfig
    from toolkit.datafree.autorecon import random_genotype
    from toolkit.train import evaluate

    torch.set_num_threads(args.threads)
    from models import checkpoint

    test = _teacher_split(checkpoint.load(args.teacher).meta, "test")
    done = _done(args.out, args.teacher)
    runs = [(st, so, se) for se in args.seeds for st in args.students for so in args.sources]
    for student_name, source, seed in runs:
        if (student_name, source, seed) in done:
            continue
        config = CompressConfig(
            teacher=args.teacher,
            to=student_name,
            generator={"real": "gdfq", "random": "autorecon"}.get(source, source),
            genotype=random_genotype(seed).to_dict() if source == "random" else None,
            search_epochs=args.search_epochs,
            generator_steps=args.generator_steps,
            steps=args.steps,
            seed=seed,
            threads=args.threads,
        )
        started = time.perf_counter()
        student, extra = _real_run(config) if source == "real" else _compress_run(config)
        accuracy = evaluate(student, test)["accuracy"]
        row = {
            "teacher": args.teacher,
            "student": student_name,
            "source": source,
            "seed": seed,
            "accuracy": accuracy,
            "steps": args.steps,
            "generator_steps": args.generator_steps,
            "search_epochs": args.search_epochs,
            "seconds": round(time.perf_counter() - started, 1),
            "threads": args.threads,
            **extra,
        }
        append_row(args.out, row)
        print(f"{student_name} {source} seed {seed}: {accuracy:.4f}", file=sys.stderr)


def summary(path: Path) -> str:
    """Mean +- std of the test accuracy per teacher, student and source (markdown)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in read_rows(path):
        groups.setdefault((row["teacher"], row["student"], row["source"]), []).append(row)
    lines = [
        "| teacher | student | data | seeds | accuracy mean +- std | per seed | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(SOURCES)}
    for (teacher, student, source), runs in sorted(
        groups.items(), key=lambda item: (item[0][0], item[0][1], order.get(item[0][2], 9))
    ):
        runs.sort(key=lambda r: r["seed"])
        accuracy = [r["accuracy"] for r in runs]
        spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
        seconds = statistics.median(r["seconds"] for r in runs)
        lines.append(
            f"| {Path(teacher).name} | {student} | {source} | {len(runs)} | "
            f"{statistics.mean(accuracy):.3f} +- {spread:.3f} | "
            f"{' / '.join(f'{a:.3f}' for a in accuracy)} | {seconds:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["run", "summary"])
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, appended to")
    ap.add_argument("--teacher", help="checkpoint of the float teacher (run)")
    ap.add_argument("--students", nargs="+", choices=STUDENTS, default=["int4", "bireal18"])
    ap.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES[:4]))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--generator-steps", type=int, default=300)
    ap.add_argument("--search-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.command == "summary":
        print(summary(args.out))
        return 0
    if not args.teacher:
        ap.error("run needs --teacher")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
