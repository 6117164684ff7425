"""toolkit.topology: degrees, invariants, determinism and parsing of the gossip graphs."""

from __future__ import annotations

import pytest

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
    with pytest.raises(ValueError):
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


def test_is_connected_false() -> None:
    topo = Topology.from_edges("two", 4, [(0, 1), (2, 3)])
    assert not topo.is_connected()
    assert topo.edges() == ((0, 1), (2, 3))


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
    with pytest.raises(ValueError) as info:
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
