"""A discrete-time simulator of gossip learning (and its FedAvg baseline) on one machine.

Every round, each online node trains its own model for ``local_steps`` steps on its data,
pushes the model to ``peers`` random neighbours (all of them by default) through a wire codec,
and merges what it has received once its :class:`edge_agent.merge.Merger` buffer holds as many
models as the trigger asks. The real MQTT agent runs the same local training
(:mod:`models.training`), the same codecs and the same ``Merger``; only the transport differs
(here: in-process queues with optional drops, delays and node churn), and how batches are drawn
from a shard: a node here walks reshuffled passes over it (``BatchSampler.endless``), an agent
draws every batch afresh (``BatchSampler.fresh``, both :class:`models.training.BatchSampler`).

A node's data is either a shard of the training split (``iid``, ``dirichlet:A``, ``shards:K``:
:mod:`toolkit.partition`) or, with ``dirichlet-pool:A``, the whole split seen through the
node's own label probabilities (``BatchSampler.pooled``, in the simulator and on a device
alike). Node ``i``'s batches come from ``numpy.random.default_rng(seed * 7_919 + i)``; with
``augment`` each batch is also rotated (up to 5 degrees) and shifted (up to 2 pixels, a crop
with padding 2) by :func:`augment_batch`, drawn from a ``torch.Generator`` of the same seed.

FedAvg (McMahan et al. 2017) is the baseline: a server holds one model; each round every
online node starts from it, trains the same ``local_steps`` steps, and the server replaces it
with the average of what comes back (:func:`edge_agent.merge.weighted_average`), weighted by
shard size (``fedavg_weights="samples"``) or equally (``"equal"``, and always for a pool).
Every record counts ``steps``, the SGD steps each node or client has taken, so methods compare
on the same axis (with ``local_steps=1`` a round is one step).

Initialisation is ``independent`` (each node draws its own weights: the gossip case, where
plain averaging collapses the weight variance) or ``common`` (one draw for all: the FL case).
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

import models
from edge_agent import codecs
from edge_agent.merge import RULES, VARIANCE_MODES, Merger, tensor_variance, weighted_average
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

from .augment import augment_batch
from .data import DATASETS, ArrayDataset, DatasetError, load_dataset
from .partition import balanced_subset, parse_partition
from .sim_batched import check_supported as check_batched
from .sim_batched import simulate_batched
from .topology import Topology, parse_topology
from .train import make_model

__all__ = [
    "SimulationConfig",
    "SimulationResult",
    "simulate",
    "default_topology",
    "augment_batch",
    "preset",
    "METHODS",
    "PRESETS",
]

METHODS = ("vc", "avg", "fedavg")
INITS = ("independent", "common")
WEIGHT_INITS = ("default", "xavier")
FEDAVG_WEIGHTS = ("samples", "equal")
ENGINES = ("loop", "batched")

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
    # SGD's momentum is Nesterov's unless this is False (classic momentum, the paper's code)
    nesterov: bool = True
    weight_decay: float = 0.0
    # "default": the model's own initialisation; "xavier": Xavier-uniform weights, zero biases
    weight_init: str = "default"
    # rotate each training batch up to 5 degrees and shift it up to 2 pixels (augment_batch)
    augment: bool = False
    self_weight: float = 0.1
    variance: str = "others"
    # VC's rescaling rule: "bitfleet" (DFL_torch's) or "dfl2" (edge_agent.merge's module doc)
    vc_rule: str = "bitfleet"
    # False: VC leaves binary layers' latent weights unscaled (averaged only)
    rescale_binary: bool = True
    peers: int = 0
    trigger: int | Literal["all"] = "all"
    init: str = "independent"
    drop: float = 0.0
    churn: float = 0.0
    delay: int = 0
    codec: str = "fp32"
    # FedAvg's server weights each client by its "samples" (shard size) or "equal"ly
    fedavg_weights: str = "samples"
    seed: int = 0
    eval_every: int = 1
    # what each node is evaluated on: "all" of the test split, "balanced" (the largest
    # class-balanced subset: 43 per class, 430 images, on digits) or "balanced:N" (N per class);
    # the subset is fixed (toolkit.partition.balanced_subset, seed 0) whatever the run's seed
    test_subset: str = "all"
    # "loop": node by node, every setting (the reference); "batched": every node of a round
    # at once (toolkit.sim_batched), the same results within float tolerance, for fp32
    # gossip without drops, churn, delays or peer sampling, SGD, models without batch norm
    engine: str = "loop"

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
            ("rescaling rule", self.vc_rule, RULES),
            ("weight init", self.weight_init, WEIGHT_INITS),
            ("fedavg weighting", self.fedavg_weights, FEDAVG_WEIGHTS),
            ("engine", self.engine, ENGINES),
        ):
            if value not in choices:
                raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")
        for name in ("nodes", "rounds", "local_steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value}")
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
        parse_test_subset(self.test_subset)
        if self.engine == "batched":
            check_batched(self)
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


PRESETS: dict[str, dict[str, Any]] = {
    # The regime of the vanishing-variance paper's code (DFL2, DFL_torch; see
    # docs/reproductions/vanishing_variance.md): a round is ONE SGD step of batch 64 for every
    # method, nodes draw from the whole split with Dir(0.5) label probabilities, self weight
    # 0.5, SGD lr 0.01 with classic momentum 0.9 and weight decay 5e-4, Xavier init with zero
    # biases, FedAvg averaging all clients with equal weights, rotation + crop augmentation,
    # and every node evaluated on a fixed class-balanced test subset. The graph stays
    # topology="auto" (rrg:8 on the default 50 nodes, as in the paper) and the rescaling rule
    # bitfleet's, which is DFL_torch's. Rounds are left to the caller.
    "paper": {
        "local_steps": 1,
        "batch_size": 64,
        "data": "dirichlet-pool:0.5",
        "self_weight": 0.5,
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 5e-4,
        "weight_init": "xavier",
        "fedavg_weights": "equal",
        "augment": True,
        "test_subset": "balanced",
    },
}
"""Named sets of :class:`SimulationConfig` settings (``bitfleet simulate --preset``)."""


def preset(name: str | None, **settings: Any) -> SimulationConfig:
    """A :class:`SimulationConfig` of preset ``name`` (None: the plain defaults).

    ``settings`` win over the preset's values, which win over the defaults, so every setting of
    a preset stays one keyword (one CLI flag) away from being overridden.
    """
    if name is None:
        return SimulationConfig(**settings)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    return SimulationConfig(**{**PRESETS[name], **settings})


def parse_test_subset(spec: str) -> int | None:
    """Items per class of a ``test_subset`` spec: 0 for ``all``, None for the largest balanced.

    Raises ValueError for anything but ``all``, ``balanced`` or ``balanced:N`` with N >= 1.
    """
    kind, sep, arg = str(spec).strip().lower().partition(":")
    if kind == "all" and not sep:
        return 0
    if kind == "balanced" and not sep:
        return None
    if kind == "balanced" and arg.strip().isdigit() and int(arg) >= 1:
        return int(arg)
    raise ValueError(
        f"bad test subset {spec!r}; use all, balanced (the largest class-balanced subset) or "
        "balanced:N (N test images of every class)"
    )


def _eval_set(config: SimulationConfig, test: ArrayDataset) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels every node is evaluated on (``config.test_subset``)."""
    per_class = parse_test_subset(config.test_subset)
    if per_class == 0:
        return test.x, test.y
    keep = balanced_subset(test.y, per_class)
    return test.x[keep], test.y[keep]


def _augmented(
    stream: Iterator[tuple[torch.Tensor, torch.Tensor]],
    generator: torch.Generator,
    fill: torch.Tensor,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in stream:
        yield augment_batch(x, generator, fill), y


def xavier_init(model: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every float convolution and linear layer.

    The paper code's initialisation (Caffe's and DFL_torch's LeNet). Binary layers keep their
    own latent-weight initialisation, as :func:`models.init.init_weights` leaves them.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not getattr(module, "is_binary", False):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


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

    @property
    def auc(self) -> float:
        """Area under the mean-accuracy curve over the run, normalised to [0, 1].

        ``(1 / R) * integral from round 0 to R of mean_accuracy(r) dr``, with ``R`` the last
        round, by the trapezoidal rule over the evaluated rounds (round 0 is the initial
        models). 1 would be perfect accuracy from the start; a method that learns faster has
        the larger area even when every method ends at the same accuracy.
        """
        rounds = np.asarray([r["round"] for r in self.history], dtype=np.float64)
        accuracy = np.asarray([r["mean_accuracy"] for r in self.history], dtype=np.float64)
        if rounds.size < 2 or rounds[-1] <= rounds[0]:
            return float(accuracy[-1])
        area = float(np.sum((accuracy[1:] + accuracy[:-1]) * np.diff(rounds)) / 2.0)
        return area / float(rounds[-1] - rounds[0])

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "history": self.history}


def _mean_variance(states: list[Model]) -> dict[str, float]:
    per_node = [tensor_variance(s) for s in states]
    return {name: float(np.mean([v[name] for v in per_node])) for name in per_node[0]}


class _Fleet:
    """The simulated nodes: models, optimizers, data streams and (for gossip) merge buffers.

    A node's data is its shard of ``train`` (``shards[node]``) or, for a pool
    (``label_probs`` given, ``shards`` None), the whole split drawn with ``label_probs[node]``.
    ``sample_weights[node]`` is its weight in FedAvg's average.
    """

    def __init__(
        self,
        config: SimulationConfig,
        train: ArrayDataset,
        shards: list[np.ndarray] | None,
        label_probs: np.ndarray | None = None,
    ) -> None:
        self.config = config
        self.models: list[nn.Module] = []
        for node in range(config.nodes):
            seed = config.seed if config.init == "common" else config.seed * 100_003 + node + 1
            torch.manual_seed(seed)
            model = make_model(config.model, train, **config.model_args)
            if config.weight_init == "xavier":
                xavier_init(model)
            self.models.append(model)
        self.optimizers = [
            make_optimizer(
                m,
                config.optimizer,
                config.lr,
                config.momentum,
                config.weight_decay,
                nesterov=config.nesterov,
            )
            for m in self.models
        ]
        fill = torch.tensor([-m / s for m, s in zip(train.mean, train.std, strict=True)])
        self.streams: list[Iterator[tuple[torch.Tensor, torch.Tensor]]] = []
        for node in range(config.nodes):
            data_seed = config.seed * 7_919 + node
            rng = np.random.default_rng(data_seed)
            if label_probs is not None:
                sampler = BatchSampler(train.x, train.y, config.batch_size)
                stream = sampler.pooled(label_probs[node], rng)
            else:
                assert shards is not None
                stream = BatchSampler(train.x, train.y, config.batch_size, shards[node]).endless(
                    rng
                )
            if config.augment:
                stream = _augmented(stream, torch.Generator().manual_seed(data_seed), fill)
            self.streams.append(stream)
        if config.fedavg_weights == "equal" or shards is None:
            self.sample_weights = [1.0] * config.nodes
        else:
            self.sample_weights = [float(len(s)) for s in shards]
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
    if config.engine == "batched":  # one worker process per torch thread
        return simulate_batched(
            config,
            progress=progress,
            train_data=train_data,
            test_data=test_data,
            workers=torch.get_num_threads(),
        )
    train = train_data or load_dataset(config.dataset, "train", root=config.data_root)
    test = test_data or load_dataset(config.dataset, "test", root=config.data_root)
    eval_x, eval_y = _eval_set(config, test)
    spec = parse_partition(config.data)
    shards, probs = spec.assign(train.y, config.nodes, seed=config.seed)
    rng = np.random.default_rng(config.seed)
    fleet = _Fleet(config, train, shards, probs)

    def accuracy(model: nn.Module) -> float:
        return evaluate(model, eval_x, eval_y)["accuracy"]

    if config.merge == "fedavg":
        step = _fedavg_round(config, fleet, rng)
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
            # SGD steps each node (each FedAvg client) has taken: rounds x local_steps
            "steps": round_index * config.local_steps,
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
            rule=config.vc_rule,
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
    config: SimulationConfig, fleet: _Fleet, rng: np.random.Generator
) -> Callable[[int], int]:
    server = state_to_numpy(fleet.models[0])

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
                weights.append(fleet.sample_weights[node])
        if states:
            server.update(weighted_average(states, weights))
        for model in fleet.models:  # every node now holds the global model
            load_numpy_state(model, server)
        return sent

    return run
