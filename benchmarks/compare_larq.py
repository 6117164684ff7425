"""Bi-Real-18 training, bitfleet vs larq-zoo, measured side by side on the same machine.

Runs the two benchmark scripts alternately (bitfleet, larq, bitfleet, larq, ...) ``--repeats``
times, each in a fresh process with the same thread count, and reports per framework the
median of the per-run median images/s, the speed ratio, and the test accuracies. Alternating
spreads any slow phase of a shared machine over both sides.

    python benchmarks/compare_larq.py --larq-python path/to/venv/bin/python --repeats 3

(set up the Larq venv as larq_bireal.py's docstring says).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(python: str, script: str, epochs: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(
        [python, str(HERE / script), "--epochs", str(epochs), "--threads", str(threads)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--larq-python",
        required=True,
        help="python of the Larq venv, e.g. path/to/venv/bin/python (see larq_bireal.py)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    runs: dict[str, list[dict]] = {"bitfleet": [], "larq": []}
    for r in range(args.repeats):
        for name, python, script in (
            ("bitfleet", sys.executable, "bireal_train.py"),
            ("larq", args.larq_python, "larq_bireal.py"),
        ):
            result = run(python, script, args.epochs, args.threads)
            runs[name].append(result)
            print(
                f"run {r + 1} {name}: {result['images_per_s_median']:.0f} images/s, "
                f"test accuracy {result['test_accuracy']:.4f}",
                file=sys.stderr,
            )
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "epochs": args.epochs,
        "repeats": args.repeats,
    }
    for name, results in runs.items():
        summary[name] = {
            "images_per_s": statistics.median(r["images_per_s_median"] for r in results),
            "images_per_s_runs": [r["images_per_s_median"] for r in results],
            "test_accuracy_runs": [r["test_accuracy"] for r in results],
        }
    summary["speed_ratio"] = summary["bitfleet"]["images_per_s"] / summary["larq"]["images_per_s"]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
