"""Wall time and accuracy of ``bitfleet demo``, the main job, on this machine.

Runs the demo ``--repeats`` times from an empty output folder (seed model trained afresh), then
once more reusing the seed model, each as a fresh ``bitfleet demo --json`` process, and prints
one JSON object: per run the wall seconds (process start to exit) and the fleet mean accuracy
at the start and the end, plus the median of the fresh runs.

    python benchmarks/demo_time.py --repeats 3
    python benchmarks/demo_time.py --repeats 1 -- --nodes 8 --rounds 20 --compare
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _run(out: Path, extra: list[str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "toolkit.cli", "demo", "--json", "--out", str(out), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"bitfleet demo failed ({done.returncode}): {done.stderr.strip()}")
    report = json.loads(done.stdout)
    return {
        "seconds": round(seconds, 1),
        "accuracy": report["accuracy"],
        "nodes": report["nodes"],
        "rounds": report["rounds"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="fresh runs (seed model trained anew)")
    ap.add_argument("extra", nargs="*", help="more `bitfleet demo` flags, after --")
    args = ap.parse_args(argv)
    fresh = []
    with tempfile.TemporaryDirectory(prefix="bitfleet-demo-") as scratch:
        for i in range(args.repeats):
            fresh.append(_run(Path(scratch) / f"fresh{i}", args.extra))
        reused = _run(Path(scratch) / f"fresh{args.repeats - 1}", args.extra)
    result = {
        "command": "bitfleet demo " + " ".join(args.extra),
        "fresh": fresh,
        "fresh_median_s": statistics.median(r["seconds"] for r in fresh),
        "reused_seed_model": reused,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
