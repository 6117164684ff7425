"""``python -m benchmarks.agent``: run the agent benchmarks, print JSON lines and a summary."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import fleet, latency, learn_rss, rss, throughput
from .common import RESULTS, Env, contention, emit, set_out

PARTS = {m.PART: m for m in (rss, learn_rss, latency, throughput, fleet)}


# (flag, type, default, help), by the part that reads them
NUMBERS = {
    "learn-rss": [
        ("--learn-rounds", int, 5, "learning rounds before the memory is read"),
        (
            "--learn-threads",
            int,
            0,
            "OMP_NUM_THREADS for the learning daemon (0: unset, torch's default)",
        ),
    ],
    "latency and throughput": [
        ("--chunk-bytes", int, 256 * 1024, "chunk size of split_chunks"),
        ("--repeats", int, 60, "latency: measured transfers per frame size"),
        ("--warmup", int, 5, "latency: transfers before those"),
        ("--payload-mb", float, 16, "throughput: size of the artifact frame (MiB)"),
        ("--throughput-repeats", int, 5, "throughput: measured transfers, after one warm-up"),
        ("--burst-mb", float, 32, "throughput: size of the burst frame (MiB; 0: no bursts)"),
    ],
    "fleet": [
        ("--agents", int, 100, "agents in the fleet"),
        ("--fleet-workers", int, 4, "worker processes the agents are spread over"),
        ("--storm-frames", int, 10, "gossip frames each agent pushes in the storm"),
        ("--storm-timeout", float, 180, "seconds to wait for the storm's frames"),
        ("--fleet-learn-rounds", int, 10, "learning rounds after the storm (0: no learning)"),
        ("--fleet-local-steps", int, 10, "local steps per learning round"),
        ("--fleet-round-interval", float, 0.5, "seconds between learning rounds"),
        ("--fleet-learn-timeout", float, 300, "seconds to wait for learning to end"),
    ],
}
# (flag, dest, help): switches that turn something off
SWITCHES = {
    "rss": [
        ("--no-full-width", "full_width", "skip the full-width Bi-Real-18 at 3x224x224"),
    ],
    "latency and throughput": [
        ("--no-nodelay-variant", "nodelay_variant", "skip the run with Nagle's algorithm on"),
    ],
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.agent",
        description="Edge agent benchmarks: memory, gossip latency, chunked throughput, a fleet "
        "of agents, each against its own Mosquitto on loopback.",
    )
    ap.add_argument("--part", default="all", choices=["all", *PARTS])
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bitfleet-agent-bench",
        help="key, artifacts and data, reused between runs (default: %(default)s)",
    )
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    groups = {name: ap.add_argument_group(name) for name in ("rss", *NUMBERS)}
    for name, switches in SWITCHES.items():
        for flag, dest, text in switches:
            groups[name].add_argument(flag, dest=dest, action="store_false", help=text)
    for name, numbers in NUMBERS.items():
        for flag, kind, default, text in numbers:
            groups[name].add_argument(
                flag, type=kind, default=default, help=text + " (default: %(default)s)"
            )
    return ap


def machine() -> dict[str, object]:
    """The record that names the machine and the library versions."""
    import numpy
    import onnxruntime
    import paho.mqtt

    return {
        "part": "machine",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "paho": paho.mqtt.__version__,
        "mosquitto": subprocess.run(
            ["mosquitto", "-h"], capture_output=True, text=True
        ).stdout.splitlines()[0],
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def summary() -> None:
    print("\n## summary")
    for record in RESULTS:
        module = PARTS.get(record["part"])
        line = module.summarize(record) if module else None
        if line:
            print(line)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    set_out(args.out)
    env = Env(args.workdir)
    emit(machine())
    for name in list(PARTS) if args.part == "all" else [args.part]:
        emit({"part": name, "what": "contention at start", **contention()})
        start = time.monotonic()
        PARTS[name].run(env, args)
        emit({"part": name, "what": "done", "wall_s": round(time.monotonic() - start, 1)})
    summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
