"""A discrete-time simulator of gossip learning (and its FedAvg baseline) on one machine.

Every round, each online node trains its own model for ``local_steps`` steps on its shard of
the data, pushes the model to ``peers`` random neighbours (all of them by default) through a
wire codec, and merges what it has received once its :class:`edge_agent.merge.Merger` buffer
holds as many models as the trigger asks. The real MQTT agent runs the same local training
(:mod:`models.training`), the same codecs and the same ``Merger``; only the transport differs
(here: in-process queues with optional drops, delays and node churn), and how batches are drawn:
a node here walks reshuffled passes over its shard (``BatchSampler.endless``), an agent draws
every batch afresh (``BatchSampler.fresh``, both :class:`models.training.BatchSampler`).

FedAvg (McMahan et al. 2017) is the baseline: a server holds one model; each round every
online node starts from it, trains the same ``local_steps`` steps, and the server replaces it
with the sample-weighted average of what comes back (:func:`edge_agent.merge.weighted_average`).

Initialisation is ``independent`` (each node draws its own weights: the gossip case, where
plain averaging collapses the weight variance) or ``common`` (one draw for all: the FL case).
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

import models
from edge_agent import codecs
from edge_agent.merge import VARIANCE_MODES, Merger, tensor_variance, weighted_average
from models.training import (
    OPTIMIZERS,
    BatchSampler,
    binary_weight_names,
    evaluate,
    load_numpy_state,
    make_optimizer,
    state_to_numpy,
    train_steps,
)

from .data import DATASETS, ArrayDataset, DatasetError, load_dataset
from .partition import parse_partition, partition
from .topology import Topology, parse_topology
from .train import make_model

__all__ = ["SimulationConfig", "SimulationResult", "simulate", "default_topology", "METHODS"]

METHODS = ("vc", "avg", "fedavg")
INITS = ("independent", "common")

Model = dict[str, np.ndarray]


def default_topology(nodes: int) -> str:
    """The graph ``topology="auto"`` picks: ``rrg:8`` from 10 nodes on, ``full`` below.

    That is ``rrg:min(8, nodes - 1)`` made valid for every fleet size: on 9 nodes or fewer a
    random (nodes - 1)-regular graph is the complete graph, and ``rrg`` needs ``d < nodes``.
    """
    return "rrg:8" if nodes >= 10 else "full"


@dataclass
class SimulationConfig:
    """One simulated fleet and learning method (saved with every result)."""

    nodes: int = 50
    # "auto": default_topology(nodes); __post_init__ replaces it with the graph it names
    topology: str = "auto"
    data: str = "dirichlet:0.5"
    dataset: str = "digits"
    data_root: str | None = None
    model: str = "lenet5"
    model_args: dict[str, Any] = field(default_factory=dict)
    merge: str = "vc"
    rounds: int = 50
    # defaults: the best shared setting of docs/reproductions/vanishing_variance.md's sweep
    local_steps: int = 20
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    self_weight: float = 0.1
    variance: str = "others"
    # False: VC leaves binary layers' latent weights unscaled (averaged only)
    rescale_binary: bool = True
    peers: int = 0
    trigger: int | Literal["all"] = "all"
    init: str = "independent"
    drop: float = 0.0
    churn: float = 0.0
    delay: int = 0
    codec: str = "fp32"
    seed: int = 0
    eval_every: int = 1

    def __post_init__(self) -> None:
        # Everything is checked here, before any work starts (and before a progress bar is
        # drawn), not in a worker; the settings of their own first, then the data, then the
        # graph, which depends on the node count, so a bad --data is reported as such.
        for what, value, choices in (
            ("merge method", self.merge, METHODS),
            ("init", self.init, INITS),
            ("codec", self.codec, codecs.CODECS),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("variance mode", self.variance, VARIANCE_MODES),
        ):
            if value not in choices:
                raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")
        for name in ("nodes", "rounds", "local_steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.momentum) and self.momentum >= 0):
            raise ValueError(f"momentum must be >= 0, got {self.momentum}")
        for name in ("drop", "churn", "self_weight"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.delay < 0 or self.peers < 0:
            raise ValueError("delay and peers must be >= 0 (peers 0 means all neighbours)")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not (self.trigger == "all" or (isinstance(self.trigger, int) and self.trigger >= 1)):
            raise ValueError(f"trigger must be 'all' or a positive integer, got {self.trigger!r}")
        self._check_model()
        self._check_dataset()
        parse_partition(self.data)
        if self.topology == "auto":
            self.topology = default_topology(self.nodes)
        if self.merge != "fedavg":  # FedAvg is a star with a server whatever the topology
            self._check_graph(parse_topology(self.topology, self.nodes, seed=self.seed))

    def _check_model(self) -> None:
        factory = models.model_entry(self.model).factory  # names the registered ones if unknown
        try:
            inspect.signature(factory).bind_partial(**self.model_args)
        except TypeError as err:
            valid = ", ".join(inspect.signature(factory).parameters)
            raise ValueError(f"model {self.model!r}: {err}; its arguments are: {valid}") from None

    def _check_dataset(self) -> None:
        key = str(self.dataset).strip().lower().partition(":")[0]  # digits-hard:<n> too
        if key not in DATASETS:
            raise DatasetError(
                f"unknown dataset {self.dataset!r}; valid names: {', '.join(sorted(DATASETS))}"
            )
        info = DATASETS[key]
        if not info.needs_root:
            return
        if self.data_root is None:
            raise DatasetError(
                f"dataset {key!r} needs its files: pass data_root=<folder> (--data-root on the "
                f"CLI); expected layout: {info.layout}"
            )
        root = Path(self.data_root).expanduser()
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise DatasetError(f"data root {root} {what}; expected: {info.layout}")

    def _check_graph(self, topology: Topology) -> None:
        fewest = min(topology.degrees)
        if fewest == 0:
            raise ValueError(
                f"gossip needs at least 2 nodes, got {self.nodes}; use merge fedavg for one node"
            )
        if isinstance(self.trigger, int) and self.trigger > fewest:
            raise ValueError(
                f"trigger {self.trigger} is never reached: a node of {self.topology} on "
                f"{self.nodes} nodes has only {fewest} neighbours; use at most {fewest} or 'all'"
            )


@dataclass
class SimulationResult:
    """Per-round metrics of one run: accuracy across nodes, weight variance, bytes sent."""

    config: SimulationConfig
    history: list[dict[str, Any]]
    final_states: list[Model] | None = field(default=None, repr=False)

    @property
    def final_accuracy(self) -> float:
        return float(self.history[-1]["mean_accuracy"])

    def rounds_to(self, target: float) -> int | None:
        """First round whose mean accuracy across nodes reaches ``target`` (None if never)."""
        for record in self.history[1:]:  # round 0 is the initial state
            if record["mean_accuracy"] >= target:
                return int(record["round"])
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "history": self.history}


def _mean_variance(states: list[Model]) -> dict[str, float]:
    per_node = [tensor_variance(s) for s in states]
    return {name: float(np.mean([v[name] for v in per_node])) for name in per_node[0]}


class _Fleet:
    """The simulated nodes: models, optimizers, data streams and (for gossip) merge buffers."""

    def __init__(
        self, config: SimulationConfig, train: ArrayDataset, shards: list[np.ndarray]
    ) -> None:
        self.config = config
        self.models: list[nn.Module] = []
        for node in range(config.nodes):
            seed = config.seed if config.init == "common" else config.seed * 100_003 + node + 1
            torch.manual_seed(seed)
            self.models.append(make_model(config.model, train, **config.model_args))
        self.optimizers = [
            make_optimizer(m, config.optimizer, config.lr, config.momentum) for m in self.models
        ]
        self.streams = [
            BatchSampler(train.x, train.y, config.batch_size, shard).endless(
                np.random.default_rng(config.seed * 7_919 + node)
            )
            for node, shard in enumerate(shards)
        ]
        self.binary_names = binary_weight_names(self.models[0])

    def train(self, node: int) -> None:
        steps = itertools.islice(self.streams[node], self.config.local_steps)
        train_steps(self.models[node], self.optimizers[node], steps)


def simulate(
    config: SimulationConfig,
    *,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
    train_data: ArrayDataset | None = None,
    test_data: ArrayDataset | None = None,
) -> SimulationResult:
    """Run one simulation; ``progress(round, record)`` is called after every evaluated round."""
    train = train_data or load_dataset(config.dataset, "train", root=config.data_root)
    test = test_data or load_dataset(config.dataset, "test", root=config.data_root)
    shards = partition(config.data, train.y, config.nodes, seed=config.seed)
    rng = np.random.default_rng(config.seed)
    fleet = _Fleet(config, train, shards)

    def accuracy(model: nn.Module) -> float:
        return evaluate(model, test.x, test.y)["accuracy"]

    if config.merge == "fedavg":
        step = _fedavg_round(config, fleet, shards, rng)
    else:
        topology = parse_topology(config.topology, config.nodes, seed=config.seed)
        step = _gossip_round(config, fleet, topology, rng)
    history: list[dict[str, Any]] = []
    sent = 0
    for round_index in range(0, config.rounds + 1):
        # round 0 records the initial models, before any training or merging
        sent += step(round_index) if round_index else 0
        if round_index % config.eval_every and round_index != config.rounds:
            continue
        if config.merge == "fedavg" and round_index:  # one global model: evaluate it once
            accuracies = [accuracy(fleet.models[0])]
        else:
            accuracies = [accuracy(m) for m in fleet.models]
        record = {
            "round": round_index,
            "mean_accuracy": float(np.mean(accuracies)),
            "min_accuracy": float(np.min(accuracies)),
            "max_accuracy": float(np.max(accuracies)),
            "bytes_sent": sent,
            "variance": _mean_variance([state_to_numpy(m) for m in fleet.models]),
        }
        history.append(record)
        if progress is not None:
            progress(round_index, record)
    return SimulationResult(config, history, [state_to_numpy(m) for m in fleet.models])


def _indices(mask: np.ndarray) -> list[int]:
    """The node numbers where ``mask`` is true, as ints."""
    return [int(i) for i in np.flatnonzero(mask)]


def _gossip_round(
    config: SimulationConfig, fleet: _Fleet, topology: Topology, rng: np.random.Generator
) -> Callable[[int], int]:
    mergers = [
        Merger(
            method=config.merge,
            self_weight=config.self_weight,
            variance=config.variance,
            trigger=config.trigger,
            neighbours=[str(p) for p in topology.neighbours[node]],
            no_rescale=() if config.rescale_binary else fleet.binary_names,
        )
        for node in range(config.nodes)
    ]
    in_flight: dict[int, list[tuple[int, int, bytes]]] = defaultdict(list)

    def run(round_index: int) -> int:
        online = rng.random(config.nodes) >= config.churn
        sent = 0
        for node in _indices(online):
            fleet.train(node)
        for node in _indices(online):
            neighbours = topology.neighbours[node]
            targets: Sequence[int] | np.ndarray
            if config.peers and config.peers < len(neighbours):
                targets = rng.choice(neighbours, size=config.peers, replace=False)
            else:
                targets = neighbours
            payload = codecs.encode(
                state_to_numpy(fleet.models[node]), config.codec, fleet.binary_names
            )
            for target in targets:
                sent += len(payload)
                if rng.random() >= config.drop:
                    in_flight[round_index + config.delay].append((node, int(target), payload))
        for sender, target, payload in in_flight.pop(round_index, []):
            if online[target]:  # a message to an offline node is lost
                mergers[target].add(str(sender), codecs.decode(payload))
        for node in _indices(online):
            merged = mergers[node].merge_into(state_to_numpy(fleet.models[node]))
            if merged is not None:
                load_numpy_state(fleet.models[node], merged)
        return sent

    return run


def _fedavg_round(
    config: SimulationConfig, fleet: _Fleet, shards: list[np.ndarray], rng: np.random.Generator
) -> Callable[[int], int]:
    server = state_to_numpy(fleet.models[0])
    sizes = [len(s) for s in shards]

    def run(round_index: int) -> int:
        online = _indices(rng.random(config.nodes) >= config.churn)
        if len(online) == 0:
            return 0
        states, weights, sent = [], [], 0
        for node in online:
            load_numpy_state(fleet.models[node], server)
            fleet.train(node)
            payload = codecs.encode(
                state_to_numpy(fleet.models[node]), config.codec, fleet.binary_names
            )
            sent += 2 * len(payload)  # model down, update up
            if rng.random() >= config.drop:
                states.append(codecs.decode(payload))
                weights.append(sizes[node])
        if states:
            server.update(weighted_average(states, weights))
        for model in fleet.models:  # every node now holds the global model
            load_numpy_state(model, server)
        return sent

    return run
