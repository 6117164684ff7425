"""Simulator throughput at scale: node-steps per second, batched engine vs the loop.

One node-step is one SGD step of one node (batch 64 in the paper preset, where a round is one
step). For every fleet size and torch thread count the script builds both engines from the
same config (``preset("paper", nodes=N, merge=...)``), warms each up, then times whole rounds
(train + merge, no evaluation) of the loop and of the batched engine in turn, interleaved, and
reports the medians. The merge share is the part of a round spent outside training: for the
loop, encoding, decoding and ``Merger.merge_into`` per node; for the batched engine, the
vectorised merge. Evaluating every node on the test subset is timed apart (one evaluation of
the whole fleet), since a run evaluates every ``eval_every`` rounds.

    python benchmarks/sim_scale.py --nodes 50,200,1000 --threads 1,2 --repeats 5 \\
        --loop-repeats-at-1000 2

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
        if spec.pooled:
            shards, probs = None, spec.label_probs(train.y, config.nodes, seed=config.seed)
        else:
            shards, probs = spec.apply(train.y, config.nodes, seed=config.seed), None
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
    def __init__(self, config: Any, train: Any, test: Any, chunk: int) -> None:
        self.sim = BatchedSimulation(config, train, test, chunk)

    def round(self) -> tuple[float, float]:
        start = time.perf_counter()
        self.sim.train_round()
        trained = time.perf_counter() - start
        self.sim.merge_round()
        return time.perf_counter() - start, trained

    def evaluate(self) -> float:
        start = time.perf_counter()
        self.sim.models.accuracies(self.sim.eval_x, self.sim.eval_y)
        return time.perf_counter() - start


def measure(
    nodes: int, merge: str, repeats: int, loop_repeats: int, chunk: int, evaluate: bool
) -> tuple[Timings, Timings, float, float]:
    config = preset("paper", nodes=nodes, merge=merge, seed=0)
    train, test = load_dataset(config.dataset, "train"), load_dataset(config.dataset, "test")
    start = time.perf_counter()
    loop = LoopRun(config, train, test)
    loop_setup = time.perf_counter() - start
    start = time.perf_counter()
    batched = BatchedRun(config, train, test, chunk)
    batched_setup = time.perf_counter() - start
    timings = Timings(), Timings()
    runs: tuple[LoopRun | BatchedRun, ...] = (loop, batched)
    for run in runs:  # warm-up: first calls allocate and pick kernels
        run.round()
    for i in range(repeats):  # interleaved, so a busy moment of the machine hits both
        for run, t in zip(runs, timings, strict=True):
            if run is loop and i >= loop_repeats:
                continue
            total, trained = run.round()
            t.rounds.append(total)
            t.train.append(trained)
    if evaluate:
        timings[1].evaluation = batched.evaluate()
        if nodes <= 200:
            timings[0].evaluation = loop.evaluate()
    return timings[0], timings[1], loop_setup, batched_setup


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

    rows = []
    estimate = None
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for nodes in (int(n) for n in args.nodes.split(",")):
            loop_repeats = args.loop_repeats_at_1000 if nodes >= 1000 else args.repeats
            loop, batched, loop_setup, batched_setup = measure(
                nodes, args.merge, args.repeats, loop_repeats, args.chunk, not args.no_eval
            )
            loop_rate, loop_share = loop.row(nodes, 1)
            rate, share = batched.row(nodes, 1)
            rows.append(
                f"| {threads} | {nodes} | {loop_rate:.0f} | {rate:.0f} | {rate / loop_rate:.2f}x "
                f"| {loop_share:.0%} | {share:.0%} | {loop.evaluation:.2f} | "
                f"{batched.evaluation:.2f} | {loop_setup:.1f} / {batched_setup:.1f} |"
            )
            print(rows[-1], flush=True)
            if nodes == 1000:
                estimate = (threads, statistics.median(batched.rounds), batched.evaluation)
    print()
    print(
        "| threads | nodes | loop node-steps/s | batched node-steps/s | ratio | loop merge share "
        "| batched merge share | loop eval s | batched eval s | setup s (loop / batched) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    if estimate is not None:
        threads, per_round, per_eval = estimate
        for every in (10, 1):
            total = 500 * per_round + (500 // every + 1) * per_eval
            print(
                f"\n1000 nodes x 500 rounds, batched, {threads} thread(s), evaluation every "
                f"{every} round(s): {500 * per_round / 60:.1f} min training and merging + "
                f"{(500 // every + 1) * per_eval / 60:.1f} min evaluation = {total / 60:.1f} min"
            )


if __name__ == "__main__":
    main()
