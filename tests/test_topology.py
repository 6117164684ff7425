"""toolkit.topology: degrees, invariants, determinism and parsing of the gossip graphs."""

from __future__ import annotations

import re

import networkx as nx
import pytest

from toolkit import topology as topology_module
from toolkit.topology import (
    TOPOLOGY_FORMS,
    Topology,
    fully_connected,
    parse_topology,
    random_regular,
    ring,
    scale_free,
    star,
)


def assert_valid(topo: Topology, n: int) -> None:
    """Simple, undirected, connected, on ``n`` nodes."""
    assert topo.num_nodes == n
    for u, peers in enumerate(topo.neighbours):
        assert list(peers) == sorted(set(peers))
        assert u not in peers
        for v in peers:
            assert u in topo.neighbours[v]
    assert topo.is_connected()
    assert len(topo.edges()) * 2 == sum(topo.degrees)
    assert all(u < v for u, v in topo.edges())


@pytest.mark.parametrize(
    ("n", "d"),
    [(50, 8), (10, 3), (20, 4), (7, 2), (100, 2), (9, 8), (12, 9), (2, 1), (1, 0), (30, 29)],
)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_regular_degree(n: int, d: int, seed: int) -> None:
    topo = random_regular(n, d, seed)
    assert_valid(topo, n)
    assert topo.degrees == (d,) * n
    assert topo.name == f"rrg:{d}"


def test_random_regular_deterministic_and_seed_dependent() -> None:
    assert random_regular(50, 8, seed=7) == random_regular(50, 8, seed=7)
    graphs = {random_regular(50, 8, seed=s).neighbours for s in range(5)}
    assert len(graphs) == 5
    assert random_regular(30, 2, 0) != random_regular(30, 2, 1)


def test_random_regular_is_networkx_draw_for_its_seed() -> None:
    # a connected first draw is exactly what networkx gives for that seed
    expected = Topology.from_networkx("rrg:8", nx.random_regular_graph(8, 50, seed=4))
    assert random_regular(50, 8, seed=4) == expected


def test_random_regular_dense_is_fast_and_connected() -> None:
    # near-complete graphs come from the complement of a sparse draw, not slow pairing
    topo = random_regular(100, 90, seed=0)
    assert_valid(topo, 100)
    assert topo.degrees == (90,) * 100


def test_random_regular_redraws_disconnected_with_derived_seeds(monkeypatch) -> None:
    seeds: list[int] = []
    real = nx.random_regular_graph

    def flaky(d, n, seed):
        seeds.append(seed)
        if len(seeds) < 3:  # two disjoint K4s: 3-regular but disconnected
            return nx.disjoint_union(nx.complete_graph(4), nx.complete_graph(4))
        return real(d, n, seed=seed)

    monkeypatch.setattr(topology_module.nx, "random_regular_graph", flaky)
    topo = random_regular(8, 3, seed=5)
    assert_valid(topo, 8)
    assert seeds[0] == 5 and len(set(seeds)) == 3
    seeds.clear()
    assert random_regular(8, 3, seed=5) == topo  # the derived seeds are deterministic too


def test_random_regular_gives_up_after_bounded_attempts(monkeypatch) -> None:
    calls: list[int] = []

    def never_connected(d, n, seed):
        calls.append(seed)
        return nx.disjoint_union(nx.complete_graph(4), nx.complete_graph(4))

    monkeypatch.setattr(topology_module.nx, "random_regular_graph", never_connected)
    with pytest.raises(RuntimeError, match="connected 3-regular graph on 8 nodes"):
        random_regular(8, 3, seed=0)
    assert len(calls) == topology_module._MAX_ATTEMPTS


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed(seed) -> None:
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        random_regular(10, 3, seed)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        scale_free(10, 2, seed)


@pytest.mark.parametrize(
    ("n", "d", "match"),
    [
        (7, 3, "even"),
        (5, 5, "d < num_nodes"),
        (5, 7, "d < num_nodes"),
        (6, 1, "connected"),
        (4, 0, "connected"),
        (6, -1, "non-negative"),
    ],
)
def test_random_regular_impossible(n: int, d: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        random_regular(n, d, 0)


@pytest.mark.parametrize("n", [3, 4, 17])
def test_ring(n: int) -> None:
    topo = ring(n)
    assert_valid(topo, n)
    assert topo.degrees == (2,) * n
    assert topo.neighbours[0] == (1, n - 1)


@pytest.mark.parametrize("n", [1, 2, 9])
def test_fully_connected(n: int) -> None:
    topo = fully_connected(n)
    assert_valid(topo, n)
    assert topo.degrees == (n - 1,) * n
    assert len(topo.edges()) == n * (n - 1) // 2


@pytest.mark.parametrize("n", [2, 3, 11])
def test_star(n: int) -> None:
    topo = star(n)
    assert_valid(topo, n)
    assert topo.degrees == (n - 1,) + (1,) * (n - 1)
    assert topo.neighbours[0] == tuple(range(1, n))
    assert all(topo.neighbours[i] == (0,) for i in range(1, n))


@pytest.mark.parametrize(("n", "m"), [(2, 1), (10, 1), (50, 2), (40, 3), (8, 7)])
@pytest.mark.parametrize("seed", [0, 5])
def test_scale_free(n: int, m: int, seed: int) -> None:
    topo = scale_free(n, m, seed)
    assert_valid(topo, n)
    assert len(topo.edges()) == m * (n - m) + m * (m - 1) // 2
    assert min(topo.degrees) >= m
    assert topo == scale_free(n, m, seed)


def test_scale_free_is_heavy_tailed() -> None:
    """Preferential attachment grows hubs far above the mean degree (2m)."""
    topo = scale_free(500, 2, seed=0)
    assert max(topo.degrees) > 5 * 4
    assert scale_free(500, 2, seed=0) != scale_free(500, 2, seed=1)


@pytest.mark.parametrize(("n", "m"), [(3, 0), (3, 3), (2, 5)])
def test_scale_free_invalid(n: int, m: int) -> None:
    with pytest.raises(ValueError, match=r"needs (m >= 1 edges per new node|num_nodes > m)"):
        scale_free(n, m, 0)


@pytest.mark.parametrize(("builder", "n"), [(ring, 2), (star, 1), (fully_connected, 0)])
def test_too_few_nodes(builder, n: int) -> None:
    with pytest.raises(ValueError, match="nodes"):
        builder(n)


def test_topology_rejects_broken_lists() -> None:
    with pytest.raises(ValueError, match="reverse"):
        Topology("x", ((1,), ()))
    with pytest.raises(ValueError, match="self-loop"):
        Topology("x", ((0,),))
    with pytest.raises(ValueError, match="sorted"):
        Topology("x", ((2, 1), (0,), (0,)))
    with pytest.raises(ValueError, match="outside"):
        Topology("x", ((3,),))
    with pytest.raises(ValueError, match="duplicate"):
        Topology.from_edges("x", 2, [(0, 1), (1, 0)])


def test_networkx_round_trip_and_relabelling() -> None:
    topo = Topology.from_networkx("petersen", nx.petersen_graph())
    assert_valid(topo, 10)
    assert topo.degrees == (3,) * 10
    assert Topology.from_networkx("petersen", topo.to_networkx()) == topo
    assert sorted(topo.to_networkx().edges()) == list(topo.edges())
    # non-integer labels are numbered in node order
    grid = Topology.from_networkx("grid", nx.grid_2d_graph(3, 4))
    assert_valid(grid, 12)
    assert sorted(grid.degrees) == [2] * 4 + [3] * 6 + [4] * 2
    # isolated nodes are kept
    lonely = nx.Graph()
    lonely.add_nodes_from(range(3))
    lonely.add_edge(0, 1)
    assert Topology.from_networkx("x", lonely).neighbours == ((1,), (0,), ())


@pytest.mark.parametrize("graph", [nx.DiGraph([(0, 1)]), nx.MultiGraph([(0, 1), (0, 1)])])
def test_from_networkx_rejects_directed_and_multigraphs(graph) -> None:
    with pytest.raises(ValueError, match="undirected simple graph"):
        Topology.from_networkx("x", graph)


def test_from_networkx_rejects_self_loops() -> None:
    with pytest.raises(ValueError, match="self-loop"):
        Topology.from_networkx("x", nx.Graph([(0, 0), (0, 1)]))


def test_is_connected_false() -> None:
    topo = Topology.from_edges("two", 4, [(0, 1), (2, 3)])
    assert not topo.is_connected()
    assert topo.edges() == ((0, 1), (2, 3))
    assert Topology("empty", ()).is_connected()
    assert Topology("one", ((),)).is_connected()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("rrg:8", lambda: random_regular(50, 8, 3)),
        ("RRG:8", lambda: random_regular(50, 8, 3)),
        ("ring", lambda: ring(50)),
        ("full", lambda: fully_connected(50)),
        (" star ", lambda: star(50)),
        ("scale-free:2", lambda: scale_free(50, 2, 3)),
        ("ba:2", lambda: scale_free(50, 2, 3)),
    ],
)
def test_parse(spec: str, expected) -> None:
    assert parse_topology(spec, 50, seed=3) == expected()


@pytest.mark.parametrize("spec", ["", "grid", "rrg", "rrg:", "rrg:x", "rrg:-2", "ring:3", "ba:2.5"])
def test_parse_bad_spec_names_valid_forms(spec: str) -> None:
    with pytest.raises(
        ValueError, match=rf"unknown topology '{re.escape(spec)}'.*valid forms"
    ) as info:
        parse_topology(spec, 10)
    for form in TOPOLOGY_FORMS:
        assert form in str(info.value)


def test_parse_graph_errors() -> None:
    with pytest.raises(ValueError, match="even"):
        parse_topology("rrg:3", 7)
    with pytest.raises(ValueError, match="d < num_nodes"):
        parse_topology("rrg:10", 10)
    with pytest.raises(ValueError, match="num_nodes > m"):
        parse_topology("ba:4", 4)
