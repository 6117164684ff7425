"""Simulator throughput at scale: node-steps per second, batched engine vs the loop.

One node-step is one SGD step of one node (batch 64 in the paper preset, where a round is one
step). For every fleet size and torch thread count the script builds both engines from the
same config (``preset("paper", nodes=N, merge=...)``), warms each up, then times whole rounds
(train + merge, no evaluation) of the loop and of the batched engine in turn, interleaved, and
reports the medians. The merge share is the part of a round spent outside training: for the
loop, encoding, decoding and ``Merger.merge_into`` per node; for the batched engine, the
vectorised merge. Evaluating every node on the test subset is timed apart (one evaluation of
the whole fleet), since a run evaluates every ``eval_every`` rounds.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/sim_scale.py --nodes 50,200,1000 --threads 1,2 \\
        --repeats 4 --loop-repeats-at-1000 2

On a machine shared with other work, OMP_WAIT_POLICY=PASSIVE keeps two OpenMP threads from
spin-waiting on a core another process holds (without it, 2 threads ran 3-10x slower than 1
for both engines on a shared 2-vCPU VM).

With 2 threads the batched engine runs twice: one process with 2 torch threads, and 2 worker
processes with one thread each (``workers=2``); the ratio takes the faster.

The last lines estimate a 1,000-node, 500-round run on the batched engine from the measured
round and evaluation times (with evaluation every 10 rounds and every round).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from toolkit.data import load_dataset
from toolkit.sim_batched import BatchedSimulation
from toolkit.simulate import _eval_set, _Fleet, _gossip_round, parse_partition, preset
from toolkit.topology import parse_topology


@dataclass
class Timings:
    rounds: list[float] = field(default_factory=list)  # seconds per round
    train: list[float] = field(default_factory=list)  # of which training
    evaluation: float = float("nan")  # one evaluation of every node

    def row(self, nodes: int, steps: int) -> tuple[float, float]:
        """Node-steps per second and merge share, from the median round."""
        median = statistics.median(self.rounds)
        share = 1 - statistics.median(t / r for t, r in zip(self.train, self.rounds, strict=True))
        return nodes * steps / median, share


class LoopRun:
    """The loop engine, built as ``simulate`` builds it; training timed through the fleet."""

    def __init__(self, config: Any, train: Any, test: Any) -> None:
        spec = parse_partition(config.data)
        shards, probs = spec.assign(train.y, config.nodes, seed=config.seed)
        self.fleet = _Fleet(config, train, shards, probs)
        self.eval_x, self.eval_y = _eval_set(config, test)
        topology = parse_topology(config.topology, config.nodes, seed=config.seed)
        self.step = _gossip_round(config, self.fleet, topology, np.random.default_rng(0))
        self.trained = 0.0
        train_node = self.fleet.train

        def timed(node: int) -> None:
            start = time.perf_counter()
            train_node(node)
            self.trained += time.perf_counter() - start

        self.fleet.train = timed  # type: ignore[method-assign]
        self.index = 0

    def round(self) -> tuple[float, float]:
        self.index += 1
        self.trained = 0.0
        start = time.perf_counter()
        self.step(self.index)
        return time.perf_counter() - start, self.trained

    def evaluate(self) -> float:
        from models.training import evaluate

        start = time.perf_counter()
        for model in self.fleet.models:
            evaluate(model, self.eval_x, self.eval_y)
        return time.perf_counter() - start


class BatchedRun:
    def __init__(self, config: Any, train: Any, test: Any, chunk: int, workers: int) -> None:
        self.sim = BatchedSimulation(config, train, test, chunk, workers)

    def round(self) -> tuple[float, float]:
        start = time.perf_counter()
        self.sim.train_round()
        trained = time.perf_counter() - start
        self.sim.merge_round()
        return time.perf_counter() - start, trained

    def evaluate(self) -> float:
        start = time.perf_counter()
        self.sim.accuracies()
        return time.perf_counter() - start


@dataclass
class Measured:
    loop: Timings
    batched: dict[str, Timings]  # "1 process", "N workers"
    setup: dict[str, float]


def measure(nodes: int, threads: int, args: argparse.Namespace, train: Any, test: Any) -> Measured:
    config = preset("paper", nodes=nodes, merge=args.merge, seed=0)
    setup: dict[str, float] = {}
    start = time.perf_counter()
    runs: dict[str, LoopRun | BatchedRun] = {"loop": LoopRun(config, train, test)}
    setup["loop"] = time.perf_counter() - start
    variants = {"1 process": 1} | ({f"{threads} workers": threads} if threads > 1 else {})
    for name, workers in variants.items():
        start = time.perf_counter()
        runs[name] = BatchedRun(config, train, test, args.chunk, workers)
        setup[name] = time.perf_counter() - start
    timings = {name: Timings() for name in runs}
    for run in runs.values():  # warm-up: first calls allocate and pick kernels
        run.round()
    loop_repeats = args.loop_repeats_at_1000 if nodes >= 1000 else args.repeats
    for i in range(args.repeats):  # interleaved, so a busy moment of the machine hits all
        for name, run in runs.items():
            if name == "loop" and i >= loop_repeats:
                continue
            total, trained = run.round()
            timings[name].rounds.append(total)
            timings[name].train.append(trained)
    if not args.no_eval:
        for name, run in runs.items():
            if name != "loop" or nodes <= 200:  # the loop's evaluation at 1000: 5x the 200's
                timings[name].evaluation = run.evaluate()
    for run in runs.values():
        if isinstance(run, BatchedRun):
            run.sim.close()
    loop = timings.pop("loop")
    return Measured(loop, timings, setup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="50,200,1000")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--merge", default="vc")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per engine")
    parser.add_argument(
        "--loop-repeats-at-1000", type=int, default=2, help="timed loop rounds from 1000 nodes"
    )
    parser.add_argument("--chunk", type=int, default=8, help="nodes per vmapped call")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation timing")
    args = parser.parse_args()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")

    header = (
        "| torch threads | nodes | loop node-steps/s | batched, 1 process | batched, workers "
        "| best / loop | merge share loop / batched | eval s, all nodes: loop / batched "
        "| setup s |"
    )
    rows = []
    estimates = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for nodes in (int(n) for n in args.nodes.split(",")):
            m = measure(nodes, threads, args, train, test)
            loop_rate, loop_share = m.loop.row(nodes, 1)
            rates = {name: t.row(nodes, 1) for name, t in m.batched.items()}
            best = max(rates, key=lambda name: rates[name][0])
            workers = [name for name in rates if name != "1 process"]
            worker_cell = f"{rates[workers[0]][0]:.0f} ({workers[0]})" if workers else "-"
            evaluation = m.batched[best].evaluation
            rows.append(
                f"| {threads} | {nodes} | {loop_rate:.0f} | {rates['1 process'][0]:.0f} "
                f"| {worker_cell} | {rates[best][0] / loop_rate:.2f}x "
                f"| {loop_share:.0%} / {rates[best][1]:.0%} "
                f"| {m.loop.evaluation:.2f} / {evaluation:.2f} "
                f"| {' / '.join(f'{v:.0f}' for v in m.setup.values())} |"
            )
            print(rows[-1], flush=True)
            if nodes == 1000:
                per_round = statistics.median(m.batched[best].rounds)
                estimates.append((threads, best, per_round, evaluation))
    print()
    print(header)
    print("|" + "---|" * 9)
    for row in rows:
        print(row)
    for threads, best, per_round, per_eval in estimates:
        for every in (10, 1):
            evals = 500 // every + 1
            total = 500 * per_round + evals * per_eval
            print(
                f"\n1000 nodes x 500 rounds, batched ({best}), {threads} torch thread(s), "
                f"evaluation every {every} round(s): {500 * per_round / 60:.1f} min training and "
                f"merging + {evals * per_eval / 60:.1f} min evaluation = {total / 60:.1f} min"
            )


if __name__ == "__main__":
    main()
