"""Communication graphs for the gossip simulator, as neighbour lists.

A gossip node pushes its model only to its neighbours, so the graph decides how fast information
mixes across the fleet. The variance-corrected averaging paper (Tian, Al-Ars, Kitsak, Hofstee,
2024) runs gossip on random regular graphs of tens of nodes and compares it with FedAvg, which is
gossip on a star whose hub is the server; :func:`ring`, :func:`fully_connected` and
:func:`scale_free` bracket those from the slowest to the fastest mixing and add a heavy-tailed
degree distribution like that of real peer-to-peer overlays::

    from toolkit.topology import parse_topology

    topo = parse_topology("rrg:8", num_nodes=50, seed=0)
    topo.neighbours[3]          # sorted tuple of node 3's peers
    topo.degrees                # (8, 8, ..., 8)

Every builder is deterministic given its ``seed`` (a :class:`numpy.random.Generator` seeded with
it), so a simulation is reproducible from its config alone. Graphs are simple (no self-loops, no
multi-edges), undirected and connected: a disconnected fleet would never agree on a model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "TOPOLOGY_FORMS",
    "Topology",
    "fully_connected",
    "parse_topology",
    "random_regular",
    "ring",
    "scale_free",
    "star",
]

#: The forms :func:`parse_topology` accepts; ``<d>`` and ``<m>`` are positive integers.
TOPOLOGY_FORMS: tuple[str, ...] = ("rrg:<d>", "ring", "full", "star", "scale-free:<m>", "ba:<m>")

#: How many times :func:`random_regular` redraws before it gives up. A random d-regular graph
#: with d >= 3 is connected with high probability, so this is only reached by a bug.
_MAX_ATTEMPTS = 1000


@dataclass(frozen=True)
class Topology:
    """An undirected simple graph on nodes ``0 .. num_nodes - 1``.

    ``neighbours[i]`` is the sorted tuple of node ``i``'s peers. The constructor checks the
    invariants (in range, sorted, no duplicates, no self-loops, symmetric), so every consumer
    can rely on them whoever built the graph.
    """

    name: str
    neighbours: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.neighbours)
        for node, peers in enumerate(self.neighbours):
            if any(not 0 <= p < n for p in peers):
                raise ValueError(f"node {node} has a neighbour outside 0..{n - 1}: {peers}")
            if list(peers) != sorted(set(peers)):
                raise ValueError(f"node {node}'s neighbours are not sorted and unique: {peers}")
            if node in peers:
                raise ValueError(f"node {node} is its own neighbour (self-loop)")
            for p in peers:
                if node not in self.neighbours[p]:
                    raise ValueError(f"edge {node}->{p} has no reverse edge {p}->{node}")

    @classmethod
    def from_edges(cls, name: str, num_nodes: int, edges: Iterable[tuple[int, int]]) -> Topology:
        """Build from undirected edges; each pair may appear once, in either order."""
        adj: list[set[int]] = [set() for _ in range(num_nodes)]
        for u, v in edges:
            u, v = int(u), int(v)
            if u == v:
                raise ValueError(f"self-loop on node {u}")
            if not (0 <= u < num_nodes and 0 <= v < num_nodes):
                raise ValueError(f"edge ({u}, {v}) outside 0..{num_nodes - 1}")
            if v in adj[u]:
                raise ValueError(f"duplicate edge ({u}, {v})")
            adj[u].add(v)
            adj[v].add(u)
        return cls(name, tuple(tuple(sorted(a)) for a in adj))

    @property
    def num_nodes(self) -> int:
        return len(self.neighbours)

    @property
    def degrees(self) -> tuple[int, ...]:
        return tuple(len(p) for p in self.neighbours)

    def edges(self) -> tuple[tuple[int, int], ...]:
        """Every undirected edge once, as ``(u, v)`` with ``u < v``, in sorted order."""
        return tuple((u, v) for u, peers in enumerate(self.neighbours) for v in peers if u < v)

    def is_connected(self) -> bool:
        """Breadth-first search from node 0; the empty graph counts as connected."""
        n = self.num_nodes
        if n == 0:
            return True
        seen = [False] * n
        seen[0] = True
        frontier = [0]
        while frontier:
            nxt = []
            for u in frontier:
                for v in self.neighbours[u]:
                    if not seen[v]:
                        seen[v] = True
                        nxt.append(v)
            frontier = nxt
        return all(seen)


def _check_nodes(n: int, minimum: int, what: str) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < minimum:
        raise ValueError(f"{what} needs an integer number of nodes >= {minimum}, got {n!r}")


def ring(n: int) -> Topology:
    """Cycle ``0 - 1 - ... - (n-1) - 0``: degree 2, the slowest-mixing connected regular graph."""
    _check_nodes(n, 3, "ring")
    return Topology.from_edges("ring", n, ((i, (i + 1) % n) for i in range(n)))


def fully_connected(n: int) -> Topology:
    """Complete graph: every node talks to every other one (degree ``n - 1``)."""
    _check_nodes(n, 1, "full")
    return Topology.from_edges("full", n, ((u, v) for u in range(n) for v in range(u + 1, n)))


def star(n: int) -> Topology:
    """Hub node 0 joined to every other node: the FedAvg case, with the hub as the server."""
    _check_nodes(n, 2, "star")
    return Topology.from_edges("star", n, ((0, v) for v in range(1, n)))


def _pairing_edges(n: int, d: int, rng: np.random.Generator) -> set[tuple[int, int]] | None:
    """One try of the pairing model that keeps good pairs and re-pairs only the bad stubs.

    Plain pairing with full rejection succeeds with probability about ``exp((1 - d^2) / 4)``,
    hopeless for d = 8 (about 1e-7). Keeping the simple pairs and reshuffling only the stubs that
    formed a loop or a duplicate (Steger and Wormald, 1999; networkx's ``random_regular_graph``)
    succeeds almost always. Returns ``None`` when the leftover stubs cannot be paired.
    """
    edges: set[tuple[int, int]] = set()
    stubs = np.repeat(np.arange(n), d)
    while stubs.size:
        rng.shuffle(stubs)
        leftover: list[int] = []
        for a, b in stubs.reshape(-1, 2).tolist():
            pair = (a, b) if a < b else (b, a)
            if a != b and pair not in edges:
                edges.add(pair)
            else:
                leftover += [a, b]
        nodes = sorted(set(leftover))
        if leftover and not any(
            (u, v) not in edges for i, u in enumerate(nodes) for v in nodes[i + 1 :]
        ):
            return None
        stubs = np.array(leftover, dtype=np.int64)
    return edges


def _regular_edges(n: int, d: int, rng: np.random.Generator) -> set[tuple[int, int]]:
    """A simple d-regular graph (not necessarily connected).

    Dense graphs (d > (n - 1) / 2) are drawn as the complement of a sparse one, where pairing
    rarely gets stuck; ``n * (n - 1 - d)`` is even whenever ``n * d`` is.
    """
    if 2 * d > n - 1:
        sparse = _regular_edges(n, n - 1 - d, rng)
        return {(u, v) for u in range(n) for v in range(u + 1, n) if (u, v) not in sparse}
    for _ in range(_MAX_ATTEMPTS):
        edges = _pairing_edges(n, d, rng)
        if edges is not None:
            return edges
    raise RuntimeError(f"could not draw a simple {d}-regular graph on {n} nodes")


def random_regular(n: int, d: int, seed: int = 0) -> Topology:
    """A random connected d-regular graph (every node has exactly ``d`` peers).

    Needs ``0 <= d < n`` and ``n * d`` even (each edge has two ends), and, to be connected,
    ``d >= 2`` (or the trivial n = 1, d = 0 and n = 2, d = 1). d = 2 draws a uniformly random
    Hamiltonian cycle, since a connected 2-regular graph is a cycle and rejection would waste
    O(sqrt(n)) tries; other d redraw until the graph is connected, which a random graph with
    d >= 3 is with high probability.
    """
    _check_nodes(n, 1, "rrg")
    if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 0:
        raise ValueError(f"rrg degree must be a non-negative integer, got {d!r}")
    if d >= n:
        raise ValueError(f"rrg:{d} needs degree d < num_nodes, got d={d}, n={n}")
    if (n * d) % 2:
        raise ValueError(f"rrg:{d} on {n} nodes is impossible: n * d = {n * d} must be even")
    if (d == 0 and n > 1) or (d == 1 and n > 2):
        raise ValueError(f"rrg:{d} on {n} nodes cannot be connected: use d >= 2")
    rng = np.random.default_rng(seed)
    name = f"rrg:{d}"
    if d == 2:
        order = rng.permutation(n).tolist()
        return Topology.from_edges(name, n, ((order[i], order[i - 1]) for i in range(n)))
    for _ in range(_MAX_ATTEMPTS):
        topo = Topology.from_edges(name, n, _regular_edges(n, d, rng))
        if topo.is_connected():
            return topo
    raise RuntimeError(f"could not draw a connected {d}-regular graph on {n} nodes")


def scale_free(n: int, m: int, seed: int = 0) -> Topology:
    """Barabasi-Albert preferential attachment: each new node links to ``m`` existing ones.

    Seed-graph convention (ours): nodes ``0 .. m-1`` start as a complete graph, node ``m`` joins
    all of them, and every later node picks ``m`` distinct targets with probability proportional
    to their degree. So the graph has ``m * (m - 1) / 2 + m * (n - m)`` edges, every degree is at
    least ``m``, and it is connected.
    """
    if not isinstance(m, (int, np.integer)) or isinstance(m, bool) or m < 1:
        raise ValueError(f"scale-free needs m >= 1 edges per new node, got {m!r}")
    _check_nodes(n, 1, "scale-free")
    if n <= m:
        raise ValueError(f"scale-free:{m} needs num_nodes > m, got n={n}")
    rng = np.random.default_rng(seed)
    edges = [(u, v) for u in range(m) for v in range(u + 1, m)]
    edges += [(u, m) for u in range(m)]
    # Each node appears here once per edge end, so a uniform draw is degree-proportional.
    ends = [x for e in edges for x in e]
    for new in range(m + 1, n):
        targets: list[int] = []
        while len(targets) < m:
            t = ends[int(rng.integers(len(ends)))]
            if t not in targets:
                targets.append(t)
        for t in targets:
            edges.append((t, new))
            ends += [t, new]
    return Topology.from_edges(f"scale-free:{m}", n, edges)


def _bad_spec(spec: str, why: str = "") -> ValueError:
    detail = f" ({why})" if why else ""
    return ValueError(
        f"unknown topology {spec!r}{detail}; valid forms: {', '.join(TOPOLOGY_FORMS)}"
    )


def parse_topology(spec: str, num_nodes: int, seed: int = 0) -> Topology:
    """Build the topology a config or CLI string names (see :data:`TOPOLOGY_FORMS`).

    ``ba:<m>`` is an alias of ``scale-free:<m>``; names are case-insensitive. Errors in the
    spec itself name the valid forms; errors of the graph (odd ``n * d``, ``d >= n``) come from
    the builder and name the numbers.
    """
    if not isinstance(spec, str):
        raise _bad_spec(repr(spec), "not a string")
    kind, sep, arg = spec.strip().lower().partition(":")
    simple = {"ring": ring, "full": fully_connected, "star": star}
    if kind in simple:
        if sep:
            raise _bad_spec(spec, f"{kind!r} takes no parameter")
        return simple[kind](num_nodes)
    if kind not in ("rrg", "scale-free", "ba"):
        raise _bad_spec(spec)
    if not arg.isdigit() or not arg.isascii():
        raise _bad_spec(spec, f"{kind!r} needs a non-negative integer parameter")
    value = int(arg)
    if kind == "rrg":
        return random_regular(num_nodes, value, seed)
    return scale_free(num_nodes, value, seed)
