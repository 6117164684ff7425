"""Sweep the shared gossip settings: rounds to target for FedAvg, VC and plain averaging.

Each line of the grid is one setting shared by every method (local steps, learning rate,
momentum, batch size, self weight). For every setting and seed the script runs FedAvg first
(its final accuracy sets the target, 90% of it, as ``bitfleet simulate --compare`` does) and
then the gossip methods, two simulations at a time (one torch thread each). Results are
appended as JSON lines so an interrupted sweep keeps what it measured.

    python benchmarks/gossip_sweep.py --grid "local_steps=5,10 lr=0.05,0.1" --seeds 0 \
        --rounds 40 --out runs/sweep.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

from toolkit.simulate import SimulationConfig, simulate  # noqa: E402


def _run(config: SimulationConfig) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    result = simulate(config)
    return {"config": asdict(config), "history": result.history}


def _parse_grid(text: str) -> list[dict[str, Any]]:
    axes: dict[str, list[Any]] = {}
    for item in text.split():
        name, values = item.split("=", 1)
        axes[name] = [_value(v) for v in values.split(",")]
    names = list(axes)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes.values())]


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _rounds_to(history: list[dict[str, Any]], target: float) -> int | None:
    for record in history[1:]:
        if record["mean_accuracy"] >= target:
            return int(record["round"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="", help='e.g. "local_steps=5,10 lr=0.05,0.1"')
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--methods", default="fedavg,vc,avg")
    parser.add_argument("--base", default="", help="fixed settings, same syntax as --grid")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    base = _parse_grid(args.base)[0] if args.base else {}
    settings = _parse_grid(args.grid) if args.grid else [{}]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    jobs = []
    for setting, seed in itertools.product(settings, seeds):
        config = replace(SimulationConfig(rounds=args.rounds, seed=seed), **base, **setting)
        jobs.append((setting, seed, {m: replace(config, merge=m) for m in methods}))

    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [
            (setting, seed, {m: pool.submit(_run, c) for m, c in configs.items()})
            for setting, seed, configs in jobs
        ]
        for setting, seed, by_method in futures:
            histories = {m: f.result()["history"] for m, f in by_method.items()}
            target = 0.9 * histories["fedavg"][-1]["mean_accuracy"] if "fedavg" in histories else 0
            line = {"setting": setting, "seed": seed, "target": target, "base": base}
            for method, history in histories.items():
                line[method] = {
                    "rounds_to_target": _rounds_to(history, target),
                    "final_accuracy": history[-1]["mean_accuracy"],
                    "curve": [round(r["mean_accuracy"], 4) for r in history],
                }
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")
            summary = {
                m: (line[m]["rounds_to_target"], round(line[m]["final_accuracy"], 3))
                for m in methods
            }
            print(json.dumps({"setting": setting, "seed": seed, **summary}), flush=True)


if __name__ == "__main__":
    main()
