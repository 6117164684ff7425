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

The graphs come from networkx (``random_regular_graph``, ``barabasi_albert_graph``,
``cycle_graph``, ``star_graph``, ``complete_graph``); this module checks the parameters with
messages that name the numbers, parses the spec strings, and freezes each graph into a
:class:`Topology`. Any other networkx family is one line, e.g.
``Topology.from_networkx("grid", nx.grid_2d_graph(5, 5))``.

Every builder is deterministic given its ``seed`` (passed to networkx, which seeds Python's
``random.Random`` with it), so a simulation is reproducible from its config alone. Graphs are
simple (no self-loops, no multi-edges), undirected and connected: a disconnected fleet would never
agree on a model.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

import networkx as nx
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

#: How many graphs :func:`random_regular` draws before it gives up on a connected one. A random
#: d-regular graph with d >= 3 is connected with high probability, so this is only reached by a
#: bug.
_MAX_ATTEMPTS = 100


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

    @classmethod
    def from_networkx(cls, name: str, graph: nx.Graph) -> Topology:
        """Freeze an undirected simple networkx graph.

        Nodes labelled ``0 .. n-1`` keep their labels; any other labels (tuples of a grid, names)
        are numbered ``0 .. n-1`` in the graph's node order.
        """
        if graph.is_directed() or graph.is_multigraph():
            raise ValueError(f"topology {name!r} needs an undirected simple graph, got {graph}")
        n = graph.number_of_nodes()
        if set(graph.nodes) != set(range(n)):
            graph = nx.convert_node_labels_to_integers(graph)
        return cls.from_edges(name, n, graph.edges())

    def to_networkx(self) -> nx.Graph:
        """The same graph as a networkx ``Graph`` on nodes ``0 .. num_nodes - 1``."""
        graph = nx.Graph()
        graph.add_nodes_from(range(self.num_nodes))
        graph.add_edges_from(self.edges())
        return graph

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
        """Whether every node reaches every other one; the empty graph counts as connected."""
        return self.num_nodes == 0 or nx.is_connected(self.to_networkx())


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_nodes(n: int, minimum: int, what: str) -> None:
    if not _is_int(n) or n < minimum:
        raise ValueError(f"{what} needs an integer number of nodes >= {minimum}, got {n!r}")


def _check_seed(seed: int) -> int:
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"topology seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def ring(n: int) -> Topology:
    """Cycle ``0 - 1 - ... - (n-1) - 0``: degree 2, the slowest-mixing connected regular graph."""
    _check_nodes(n, 3, "ring")
    return Topology.from_networkx("ring", nx.cycle_graph(int(n)))


def fully_connected(n: int) -> Topology:
    """Complete graph: every node talks to every other one (degree ``n - 1``)."""
    _check_nodes(n, 1, "full")
    return Topology.from_networkx("full", nx.complete_graph(int(n)))


def star(n: int) -> Topology:
    """Hub node 0 joined to every other node: the FedAvg case, with the hub as the server."""
    _check_nodes(n, 2, "star")
    return Topology.from_networkx("star", nx.star_graph(int(n) - 1))  # star_graph(k): k leaves


def _derived_seed(seed: int, attempt: int) -> int:
    """``seed`` itself for the first draw, then seeds spread from it by numpy's SeedSequence."""
    if attempt == 0:
        return seed
    return int(np.random.SeedSequence([seed, attempt]).generate_state(1, np.uint64)[0])


def _regular_graph(n: int, d: int, seed: int) -> nx.Graph:
    """A simple d-regular graph from networkx (not necessarily connected).

    Dense graphs (d > (n - 1) / 2) are drawn as the complement of a sparse one: networkx's
    pairing gets stuck and retries for long near the complete graph (seconds to minutes at
    n = 100, d = 90), but hardly ever on the sparse side; ``n * (n - 1 - d)`` is even whenever
    ``n * d`` is, and a graph whose degrees all exceed (n - 1) / 2 is always connected.
    """
    if 2 * d > n - 1:
        return nx.complement(nx.random_regular_graph(n - 1 - d, n, seed=seed))
    return nx.random_regular_graph(d, n, seed=seed)


def random_regular(n: int, d: int, seed: int = 0) -> Topology:
    """A random connected d-regular graph (every node has exactly ``d`` peers).

    Needs ``0 <= d < n`` and ``n * d`` even (each edge has two ends), and, to be connected,
    ``d >= 2`` (or the trivial n = 1, d = 0 and n = 2, d = 1). d = 2 draws a uniformly random
    Hamiltonian cycle, since a connected 2-regular graph is a cycle and rejection would waste
    O(sqrt(n)) draws. Other d take ``nx.random_regular_graph(d, n, seed=seed)`` and, if it comes
    out disconnected (rare for d >= 3), redraw with seeds derived from ``seed``, at most
    ``_MAX_ATTEMPTS`` times.
    """
    _check_nodes(n, 1, "rrg")
    if not _is_int(d) or d < 0:
        raise ValueError(f"rrg degree must be a non-negative integer, got {d!r}")
    if d >= n:
        raise ValueError(f"rrg:{d} needs degree d < num_nodes, got d={d}, n={n}")
    if (n * d) % 2:
        raise ValueError(f"rrg:{d} on {n} nodes is impossible: n * d = {n * d} must be even")
    if (d == 0 and n > 1) or (d == 1 and n > 2):
        raise ValueError(f"rrg:{d} on {n} nodes cannot be connected: use d >= 2")
    n, d, seed = int(n), int(d), _check_seed(seed)
    name = f"rrg:{d}"
    if d == 2:
        order = random.Random(seed).sample(range(n), n)
        return Topology.from_networkx(name, nx.cycle_graph(order))
    for attempt in range(_MAX_ATTEMPTS):
        graph = _regular_graph(n, d, _derived_seed(seed, attempt))
        if nx.is_connected(graph):
            return Topology.from_networkx(name, graph)
    raise RuntimeError(
        f"could not draw a connected {d}-regular graph on {n} nodes in {_MAX_ATTEMPTS} attempts"
    )


def scale_free(n: int, m: int, seed: int = 0) -> Topology:
    """Barabasi-Albert preferential attachment: each new node links to ``m`` existing ones.

    ``nx.barabasi_albert_graph`` grown from a complete graph on nodes ``0 .. m`` (networkx's
    default seed graph is a star, whose leaves would start below degree ``m``): every later node
    picks ``m`` distinct targets with probability proportional to their degree. So the graph has
    ``m * (m - 1) / 2 + m * (n - m)`` edges, every degree is at least ``m``, and it is connected.
    """
    if not _is_int(m) or m < 1:
        raise ValueError(f"scale-free needs m >= 1 edges per new node, got {m!r}")
    _check_nodes(n, 1, "scale-free")
    if n <= m:
        raise ValueError(f"scale-free:{m} needs num_nodes > m, got n={n}")
    n, m, seed = int(n), int(m), _check_seed(seed)
    graph = nx.barabasi_albert_graph(n, m, seed=seed, initial_graph=nx.complete_graph(m + 1))
    return Topology.from_networkx(f"scale-free:{m}", graph)


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
