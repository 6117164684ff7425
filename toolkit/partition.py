"""Split a dataset among the nodes of a simulated fleet, IID or with label skew.

Every partitioner returns ``list[np.ndarray]``: one sorted int64 index array per node. The arrays
are disjoint and together cover ``range(len(labels))`` exactly once, and the result depends only
on the arguments and ``seed`` (a ``numpy.random.default_rng`` stream), so a simulation can be
replayed and two processes agree on who holds what without talking.

Three recipes, the ones federated-learning papers compare against:

``iid``
    A seeded shuffle cut into near-equal parts (sizes differ by at most one).
``dirichlet:<alpha>``
    For every class, the share each node gets is drawn from Dir(alpha, ..., alpha) (Hsu et al.,
    2019), with the capacity rule of FedLab and NIID-Bench: a node that already holds its fair
    share of items gets no more of the next classes, which keeps node sizes from diverging.
    Small alpha (0.1) gives each node a few dominant classes; large alpha (100) is close to IID.
    Draws are repeated until every node holds at least ``min_size`` items.
``shards:<k>``
    Sort by label, cut into ``num_nodes * k`` shards and give each node ``k`` of them
    (McMahan et al., 2017), so each node sees at most ``k`` classes.

One recipe is not a split but a *pool*, the data model of the vanishing-variance paper's code
(DFL2, DFL_torch):

``dirichlet-pool:<alpha>``
    No node holds items of its own: every node draws its batches from the whole split, each
    sample's label with the node's own probabilities, drawn from Dir(alpha, ..., alpha), and
    then an item of that label uniformly (:func:`dirichlet_pool` draws the probabilities,
    :meth:`models.training.BatchSampler.pooled` the batches). A pool is a
    ``(num_nodes, num_classes)`` matrix of label probabilities, not a list of index arrays, so
    :meth:`PartitionSpec.apply` refuses it and :meth:`PartitionSpec.label_probs` gives it;
    :func:`node_train_sets` gives, for either kind, the tensors a node's agent reads from its
    ``train.safetensors`` (a pool node gets the whole split plus its ``label_probs``).

:func:`partition` takes the same recipes as strings (what the CLI and the simulator config use),
:func:`label_skew` measures how far a partition is from IID, and :func:`balanced_subset` picks
a fixed class-balanced evaluation set.

# References
- Hsu, Qi, Brown: "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification", 2019.
- McMahan et al.: "Communication-Efficient Learning of Deep Networks from Decentralized Data",
  AISTATS 2017.
- Li et al.: "Federated Learning on Non-IID Data Silos: An Experimental Study" (NIID-Bench),
  ICDE 2022.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PARTITION_FORMS",
    "POOL_KINDS",
    "PartitionSpec",
    "balanced_subset",
    "dirichlet",
    "dirichlet_pool",
    "iid",
    "label_skew",
    "node_train_sets",
    "parse_partition",
    "partition",
    "shards",
]

PARTITION_FORMS = (
    "iid",
    "dirichlet:<alpha>",
    "shards:<classes_per_node>",
    "dirichlet-pool:<alpha>",
)

POOL_KINDS = ("dirichlet-pool",)
"""Recipes where every node draws from the whole split with its own label probabilities."""


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {array.shape}")
    return array


def _check_nodes(num_items: int, num_nodes: object) -> int:
    nodes = _check_int(num_nodes, "num_nodes", 1)
    if nodes > num_items:
        raise ValueError(
            f"cannot give {nodes} nodes at least one item each from {num_items} items; "
            "use fewer nodes"
        )
    return nodes


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)):
        raise ValueError(f"alpha must be a number, got {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    return float(alpha)


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(num_items: int, num_nodes: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(num_items)`` with ``seed`` and cut it into ``num_nodes`` near-equal parts."""
    items = _check_int(num_items, "num_items", 0)
    nodes = _check_nodes(items, num_nodes)
    order = np.random.default_rng(seed).permutation(items)
    return _finish(np.array_split(order, nodes))


def dirichlet(
    labels: np.ndarray,
    num_nodes: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split: per class, node shares ~ Dir(alpha) (Hsu et al. 2019, FedLab).

    Args:
        labels: class of each item, shape ``(N,)``; any integer or string labels.
        num_nodes: number of parts.
        alpha: Dirichlet concentration, > 0; smaller is more skewed.
        seed: seed of the random stream; same arguments and seed give the same split.
        min_size: every node gets at least this many items (0 allows empty nodes). Draws that
            miss it are repeated, up to ``max_tries`` times.
        max_tries: bound on the repeated draws before giving up.

    Raises:
        ValueError: bad arguments, or no draw met ``min_size`` within ``max_tries``.
    """
    y = _check_labels(labels)
    total = y.shape[0]
    nodes = _check_nodes(total, num_nodes)
    _check_alpha(alpha)
    least = _check_int(min_size, "min_size", 0)
    tries = _check_int(max_tries, "max_tries", 1)
    if least * nodes > total:
        raise ValueError(
            f"cannot give {nodes} nodes at least {least} items each from {total} items"
        )

    rng = np.random.default_rng(seed)
    _, y_codes = np.unique(y, return_inverse=True)
    by_class = [np.flatnonzero(y_codes == c) for c in range(int(y_codes.max(initial=-1)) + 1)]
    capacity = total / nodes
    concentration = np.full(nodes, float(alpha))
    for _ in range(tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(nodes)]
        sizes = np.zeros(nodes, dtype=np.int64)
        for class_members in by_class:
            members = rng.permutation(class_members)
            shares = rng.dirichlet(concentration)
            # FedLab / NIID-Bench capacity rule: nodes past their fair share take no more.
            shares = shares * (sizes < capacity)
            if shares.sum() <= 0:  # every open node drew an exact 0 (tiny alpha underflow)
                shares = (sizes < capacity).astype(np.float64)
            cuts = (np.cumsum(shares / shares.sum()) * members.size).astype(np.int64)[:-1]
            for node, chunk in enumerate(np.split(members, cuts)):
                parts[node].append(chunk)
                sizes[node] += chunk.size
        if sizes.min() >= least:
            return _finish([np.concatenate(p) if p else np.empty(0, np.int64) for p in parts])
    raise ValueError(
        f"dirichlet(alpha={alpha}) gave some node fewer than {least} items in {tries} draws; "
        "raise alpha, use fewer nodes or lower min_size"
    )


def _shards_per_class(counts: np.ndarray, num_shards: int) -> np.ndarray:
    """Split ``num_shards`` among classes in proportion to their sizes, at least 1 each.

    Largest-remainder rounding, with no class given more shards than it has items.
    """
    target = num_shards * counts / counts.sum()
    alloc = np.clip(np.floor(target).astype(np.int64), 1, counts)
    while alloc.sum() < num_shards:
        room = np.where(alloc < counts, target - alloc, -np.inf)
        alloc[int(np.argmax(room))] += 1
    while alloc.sum() > num_shards:
        excess = np.where(alloc > 1, alloc - target, -np.inf)
        alloc[int(np.argmax(excess))] -= 1
    return alloc


def shards(
    labels: np.ndarray, num_nodes: int, classes_per_node: int, seed: int = 0
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. (2017): each node gets a few label shards.

    Items are sorted by label (shuffled within a label with ``seed``) and cut into
    ``num_nodes * classes_per_node`` shards; each node receives ``classes_per_node`` shards at
    random. Cuts fall on label boundaries (each class gets a number of shards proportional to
    its size), so no shard mixes two labels and a node holds at most ``classes_per_node``
    classes, also when classes have unequal sizes. When there are fewer shards than classes,
    shards must mix labels to cover every item and nodes hold more classes.
    """
    y = _check_labels(labels)
    total = y.shape[0]
    nodes = _check_nodes(total, num_nodes)
    per_node = _check_int(classes_per_node, "classes_per_node", 1)
    num_shards = nodes * per_node
    if num_shards > total:
        raise ValueError(
            f"{nodes} nodes x {per_node} shards = {num_shards} shards exceeds {total} items; "
            "lower num_nodes or classes_per_node"
        )

    rng = np.random.default_rng(seed)
    _, y_codes = np.unique(y, return_inverse=True)
    by_class = [rng.permutation(np.flatnonzero(y_codes == c)) for c in range(y_codes.max() + 1)]
    if num_shards >= len(by_class):
        counts = np.asarray([m.size for m in by_class], dtype=np.int64)
        pieces: list[np.ndarray] = []
        for members, k in zip(by_class, _shards_per_class(counts, num_shards), strict=True):
            pieces.extend(np.array_split(members, int(k)))
    else:
        pieces = np.array_split(np.concatenate(by_class), num_shards)
    owner = rng.permutation(num_shards).reshape(nodes, per_node)
    return _finish([np.concatenate([pieces[s] for s in row]) for row in owner])


def _class_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` as non-negative integers (a pool's probabilities are indexed by label)."""
    y = _check_labels(labels)
    if y.size == 0:
        raise ValueError("labels is empty")
    if not np.issubdtype(y.dtype, np.integer) or int(y.min()) < 0:
        raise ValueError(
            f"a label pool needs non-negative integer labels (class numbers), got {y.dtype}"
        )
    return y.astype(np.int64, copy=False)


def dirichlet_pool(labels: np.ndarray, num_nodes: int, alpha: float, seed: int = 0) -> np.ndarray:
    """Per-node label probabilities ~ Dir(alpha) over the classes present in ``labels``.

    The data model of the vanishing-variance paper's code: no node holds items of its own;
    node ``i`` draws each training sample's label ``c`` with probability ``probs[i, c]`` and
    then an item of label ``c`` from the whole split (:meth:`models.training.BatchSampler.pooled`).

    Args:
        labels: class number of each item of the split, non-negative integers, shape ``(N,)``.
        num_nodes: number of nodes (any number >= 1: nodes share the pool).
        alpha: Dirichlet concentration, > 0; smaller is more skewed.
        seed: seed of the ``numpy.random.default_rng`` stream; one row is drawn per node, in
            node order, so the first nodes' rows do not depend on ``num_nodes``.

    Returns:
        float64 array ``(num_nodes, max(labels) + 1)`` whose rows sum to 1; a class number with
        no item in ``labels`` gets probability 0 on every node.

    Raises:
        ValueError: bad arguments, or an alpha so small that a draw underflows to all zeros.
    """
    y = _class_labels(labels)
    nodes = _check_int(num_nodes, "num_nodes", 1)
    concentration = _check_alpha(alpha)
    present = np.flatnonzero(np.bincount(y) > 0)
    rng = np.random.default_rng(seed)
    drawn = rng.dirichlet(np.full(present.size, concentration), size=nodes)
    totals = drawn.sum(axis=1)
    if not np.all(np.isfinite(totals) & (totals > 0)):
        raise ValueError(f"dirichlet-pool alpha {alpha} is too small to draw; raise it")
    probs = np.zeros((nodes, int(y.max()) + 1))
    probs[:, present] = drawn / totals[:, None]
    return probs


def balanced_subset(labels: np.ndarray, per_class: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced subset: ``per_class`` items of every class.

    ``None`` takes the largest balanced subset (the size of the smallest class; on the digits
    test split 43 per class, 430 of 450 images). The items are chosen with ``seed`` (0: the
    same subset for every run, whatever the run's own seed), so it is a fixed evaluation set,
    as the paper's code evaluates every node on a fixed balanced set of test images.

    Raises:
        ValueError: ``per_class`` < 1 or larger than the smallest class.
    """
    y = _check_labels(labels)
    if y.size == 0:
        raise ValueError("labels is empty")
    _, codes = np.unique(y, return_inverse=True)
    counts = np.bincount(codes)
    smallest = int(counts.min())
    take = smallest if per_class is None else _check_int(per_class, "per_class", 1)
    if take > smallest:
        raise ValueError(
            f"cannot take {take} items of every class: the smallest class has {smallest}; "
            f"use at most {smallest} per class"
        )
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(codes == c))[:take] for c in range(counts.size)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed recipe: ``kind`` (iid, dirichlet, shards, dirichlet-pool) and its ``value``.

    ``str(spec)`` gives back the canonical string, so a spec round-trips through a config file.
    """

    kind: str
    value: float | int | None = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value!r}"

    @property
    def pooled(self) -> bool:
        """True for a pool (every node draws from the whole split), False for a split."""
        return self.kind in POOL_KINDS

    def label_probs(self, labels: np.ndarray, num_nodes: int, seed: int = 0) -> np.ndarray:
        """A pool's ``(num_nodes, num_classes)`` label probabilities (:func:`dirichlet_pool`)."""
        if self.kind == "dirichlet-pool":
            assert self.value is not None
            return dirichlet_pool(labels, num_nodes, float(self.value), seed)
        raise ValueError(f"{self} splits the data among the nodes; it has no label probabilities")

    def assign(
        self, labels: np.ndarray, num_nodes: int, seed: int = 0
    ) -> tuple[list[np.ndarray] | None, np.ndarray | None]:
        """What each node trains on, for splits and pools alike.

        ``(shards, None)`` for a split (:meth:`apply`), ``(None, probs)`` for a pool
        (:meth:`label_probs`).
        """
        if self.pooled:
            return None, self.label_probs(labels, num_nodes, seed)
        return self.apply(labels, num_nodes, seed), None

    def apply(self, labels: np.ndarray, num_nodes: int, seed: int = 0) -> list[np.ndarray]:
        """Partition ``labels`` among ``num_nodes`` nodes with this recipe (splits only)."""
        if self.pooled:
            raise ValueError(
                f"{self} is a pool, not a split: every node draws from the whole data with its "
                "own label probabilities; use label_probs() or node_train_sets()"
            )
        if self.kind == "iid":
            return iid(len(_check_labels(labels)), num_nodes, seed)
        if self.kind == "dirichlet":
            assert self.value is not None
            return dirichlet(labels, num_nodes, float(self.value), seed)
        if self.kind == "shards":
            assert self.value is not None
            return shards(labels, num_nodes, int(self.value), seed)
        raise ValueError(
            f"unknown partition kind {self.kind!r}; valid: {', '.join(PARTITION_FORMS)}"
        )


def parse_partition(spec: str | PartitionSpec) -> PartitionSpec:
    """Parse a recipe: ``iid``, ``dirichlet:<alpha>``, ``dirichlet-pool:<alpha>``, ``shards:<k>``.

    ``alpha`` must be a number > 0 and ``k`` an integer >= 1.

    Raises:
        ValueError: naming the bad spec and the valid forms.
    """
    if isinstance(spec, PartitionSpec):
        return parse_partition(str(spec))
    valid = (
        f"valid forms: {', '.join(PARTITION_FORMS)}, e.g. dirichlet:0.5, shards:2 or "
        "dirichlet-pool:0.5"
    )
    if not isinstance(spec, str):
        raise ValueError(f"partition spec must be a string, got {spec!r}; {valid}")
    kind, sep, arg = spec.strip().partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    if kind == "iid" and not sep:
        return PartitionSpec("iid")
    if kind in ("dirichlet", "dirichlet-pool") and arg:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if math.isfinite(alpha) and alpha > 0:
            return PartitionSpec(kind, alpha)
        raise ValueError(f"bad partition {spec!r}: alpha must be a number > 0; {valid}")
    if kind == "shards" and arg:
        if arg.isdigit() and int(arg) >= 1:
            return PartitionSpec("shards", int(arg))
        raise ValueError(f"bad partition {spec!r}: shards needs an integer >= 1; {valid}")
    raise ValueError(f"bad partition {spec!r}; {valid}")


def partition(
    spec: str | PartitionSpec, labels: np.ndarray, num_nodes: int, seed: int = 0
) -> list[np.ndarray]:
    """Partition ``labels`` among ``num_nodes`` nodes with a recipe string such as ``shards:2``."""
    return parse_partition(spec).apply(labels, num_nodes, seed)


def node_train_sets(
    spec: str | PartitionSpec, x: np.ndarray, y: np.ndarray, num_nodes: int, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """What each node's agent reads from its ``train.safetensors``, for any recipe.

    A split gives node ``i`` its items, ``{"x": x[part], "y": y[part]}``; a pool gives every
    node the whole split and its own label probabilities, ``{"x": x, "y": y, "label_probs":
    probs[i]}`` (float32), from which the agent draws its batches
    (:func:`edge_agent.learner.load_local_data`). The arrays of a pool node are shared, not
    copied: write them out, do not modify them.
    """
    from edge_agent.learning import LABEL_PROBS  # torch-free: the agent's data format

    parsed = parse_partition(spec)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} items but y has {len(y)}")
    if parsed.pooled:
        probs = parsed.label_probs(y, num_nodes, seed).astype(np.float32)
        return [{"x": x, "y": y, LABEL_PROBS: row} for row in probs]
    return [{"x": x[part], "y": y[part]} for part in parsed.apply(y, num_nodes, seed)]


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each node's label distribution and the global one.

    0 means every node sees the classes in the global proportions (IID); values near 1 mean
    nodes see disjoint classes. Empty nodes have no distribution and are left out.
    """
    y = _check_labels(labels)
    if y.size == 0:
        raise ValueError("labels is empty")
    _, codes = np.unique(y, return_inverse=True)
    num_classes = int(codes.max()) + 1
    global_dist = np.bincount(codes, minlength=num_classes) / codes.size
    distances = []
    for part in parts:
        idx = np.asarray(part, dtype=np.int64)
        if idx.size == 0:
            continue
        if idx.min() < 0 or idx.max() >= y.size:
            raise ValueError(f"partition index out of range 0..{y.size - 1}")
        local = np.bincount(codes[idx], minlength=num_classes) / idx.size
        distances.append(0.5 * float(np.abs(local - global_dist).sum()))
    if not distances:
        raise ValueError("every part is empty; nothing to measure")
    return float(np.mean(distances))
