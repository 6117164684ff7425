"""Federated partitioners: coverage, determinism, label skew, spec parsing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.data import load_dataset
from toolkit.partition import (
    PartitionSpec,
    balanced_subset,
    dirichlet,
    dirichlet_pool,
    iid,
    label_skew,
    parse_partition,
    partition,
    shards,
)

FAST = settings(max_examples=60, deadline=None)


def assert_exact_cover(parts: list[np.ndarray], num_items: int, num_nodes: int) -> None:
    assert len(parts) == num_nodes
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(num_items))


@st.composite
def labelled(draw, max_items: int = 300):
    num_items = draw(st.integers(1, max_items))
    num_classes = draw(st.integers(1, 12))
    labels = np.asarray(
        draw(st.lists(st.integers(0, num_classes - 1), min_size=num_items, max_size=num_items))
    )
    num_nodes = draw(st.integers(1, min(num_items, 25)))
    return labels, num_nodes


@FAST
@given(st.integers(1, 500), st.data(), st.integers(0, 2**32 - 1))
def test_iid_is_an_exact_balanced_cover(num_items, data, seed):
    num_nodes = data.draw(st.integers(1, num_items))
    parts = iid(num_items, num_nodes, seed)
    assert_exact_cover(parts, num_items, num_nodes)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@FAST
@given(labelled(), st.floats(0.01, 1000), st.integers(0, 2**32 - 1))
def test_dirichlet_is_an_exact_cover(case, alpha, seed):
    labels, num_nodes = case
    parts = dirichlet(labels, num_nodes, alpha, seed=seed, min_size=0)
    assert_exact_cover(parts, len(labels), num_nodes)
    again = dirichlet(labels, num_nodes, alpha, seed=seed, min_size=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@FAST
@given(labelled(), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_shards_is_an_exact_cover_with_few_classes_per_node(case, per_node, seed):
    labels, num_nodes = case
    if num_nodes * per_node > len(labels):
        with pytest.raises(ValueError, match="shards exceeds"):
            shards(labels, num_nodes, per_node, seed)
        return
    parts = shards(labels, num_nodes, per_node, seed)
    assert_exact_cover(parts, len(labels), num_nodes)
    if num_nodes * per_node >= len(np.unique(labels)):
        assert all(len(np.unique(labels[p])) <= per_node for p in parts)


def test_dirichlet_min_size_is_met():
    labels = np.repeat(np.arange(10), 30)
    parts = dirichlet(labels, 20, alpha=0.1, seed=3, min_size=5)
    assert min(len(p) for p in parts) >= 5
    assert_exact_cover(parts, 300, 20)


def test_same_seed_same_split_other_seed_other_split():
    labels = np.repeat(np.arange(5), 40)
    for make in (
        lambda s: iid(200, 7, s),
        lambda s: dirichlet(labels, 7, 0.5, s),
        lambda s: shards(labels, 7, 2, s),
    ):
        first, again, other = make(11), make(11), make(12)
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
        assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_shards_on_digits_gives_at_most_k_classes():
    labels = load_dataset("digits", image_size=8).y
    for per_node in (1, 2, 3):
        parts = shards(labels, 10, per_node, seed=0)
        assert_exact_cover(parts, len(labels), 10)
        assert all(len(np.unique(labels[p])) <= per_node for p in parts)


def test_dirichlet_skew_grows_as_alpha_falls_on_digits():
    labels = load_dataset("digits", image_size=8).y
    skew = {a: label_skew(labels, dirichlet(labels, 10, a, seed=0)) for a in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.1 < 0.5 < skew[0.1]
    assert label_skew(labels, iid(len(labels), 10)) < skew[1.0]


def test_label_skew_on_hand_made_parts():
    labels = np.array([0, 0, 1, 1])
    assert label_skew(labels, [np.array([0, 2]), np.array([1, 3])]) == 0.0
    assert label_skew(labels, [np.array([0, 1]), np.array([2, 3])]) == 0.5
    # (1, 0) is 0.5 from (0.5, 0.5), (1/3, 2/3) is 1/6; the empty node is left out.
    uneven = [np.array([0]), np.array([], dtype=np.int64), np.array([1, 2, 3])]
    assert label_skew(labels, uneven) == pytest.approx((0.5 + 1 / 6) / 2)
    with pytest.raises(ValueError, match="out of range"):
        label_skew(labels, [np.array([4])])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iid", PartitionSpec("iid")),
        (" IID ", PartitionSpec("iid")),
        ("dirichlet:0.5", PartitionSpec("dirichlet", 0.5)),
        ("Dirichlet: 1e-1", PartitionSpec("dirichlet", 0.1)),
        ("shards:2", PartitionSpec("shards", 2)),
        ("dirichlet-pool:0.5", PartitionSpec("dirichlet-pool", 0.5)),
        (" Dirichlet-Pool: 2 ", PartitionSpec("dirichlet-pool", 2.0)),
    ],
)
def test_parse_partition(spec, expected):
    parsed = parse_partition(spec)
    assert parsed == expected
    assert parse_partition(str(parsed)) == parsed


@pytest.mark.parametrize(
    "spec",
    ["", "iid:2", "dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1", "dirichlet:abc",
     "dirichlet:nan", "dirichlet:inf", "shards", "shards:0", "shards:1.5", "shards:-2", "label:3",
     "dirichlet-pool", "dirichlet-pool:", "dirichlet-pool:0", "dirichlet-pool:-1",
     "dirichlet-pool:x", "pool:0.5"],
)  # fmt: skip
def test_parse_partition_errors_name_valid_forms(spec):
    with pytest.raises(
        ValueError, match=r"valid forms: iid, dirichlet:<alpha>, shards:.*dirichlet-pool:<alpha>"
    ):
        parse_partition(spec)


def test_bad_pool_alpha_is_named():
    with pytest.raises(ValueError, match=r"bad partition 'dirichlet-pool:-1': alpha must be"):
        parse_partition("dirichlet-pool:-1")


def test_dirichlet_pool_draws_a_probability_row_per_node():
    labels = np.array([0, 1, 1, 3, 3, 3, 4] * 10)  # class 2 has no item
    probs = dirichlet_pool(labels, 6, 0.5, seed=4)
    assert probs.shape == (6, 5) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert np.all(probs[:, 2] == 0) and np.all(probs >= 0)
    np.testing.assert_array_equal(probs, dirichlet_pool(labels, 6, 0.5, seed=4))
    assert not np.array_equal(probs, dirichlet_pool(labels, 6, 0.5, seed=5))
    # more nodes append rows: the first nodes keep theirs
    np.testing.assert_array_equal(dirichlet_pool(labels, 9, 0.5, seed=4)[:6], probs)
    # nodes may outnumber items: they share the pool
    assert dirichlet_pool(labels[:3], 50, 1.0).shape == (50, 2)
    spec = parse_partition("dirichlet-pool:0.5")
    assert spec.pooled and not parse_partition("dirichlet:0.5").pooled
    np.testing.assert_array_equal(spec.label_probs(labels, 6, seed=4), probs)


def test_dirichlet_pool_skew_follows_alpha():
    labels = np.repeat(np.arange(10), 20)

    def mean_top_share(alpha: float) -> float:
        return float(dirichlet_pool(labels, 500, alpha, seed=0).max(axis=1).mean())

    # alpha 0.1: one class dominates a node; alpha 100: close to 1/10 each
    assert mean_top_share(0.1) > 0.6 > 0.35 > mean_top_share(1.0) > 0.2 > mean_top_share(100.0)


def test_a_pool_is_not_a_split():
    labels = np.repeat(np.arange(4), 5)
    with pytest.raises(ValueError, match="is a pool, not a split"):
        partition("dirichlet-pool:0.5", labels, 3)
    with pytest.raises(ValueError, match="has no label probabilities"):
        parse_partition("shards:2").label_probs(labels, 3)
    with pytest.raises(ValueError, match="non-negative integer labels"):
        dirichlet_pool(np.array(["a", "b"]), 2, 1.0)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        dirichlet_pool(labels, 2, 0.0)


def test_assign_gives_shards_for_a_split_and_probabilities_for_a_pool():
    labels = np.repeat(np.arange(4), 5)
    shards, probs = parse_partition("shards:2").assign(labels, 3, seed=1)
    assert probs is None and [list(s) for s in shards] == [
        list(s) for s in partition("shards:2", labels, 3, seed=1)
    ]
    shards, probs = parse_partition("dirichlet-pool:0.5").assign(labels, 3, seed=1)
    assert shards is None
    np.testing.assert_array_equal(probs, dirichlet_pool(labels, 3, 0.5, seed=1))


def test_balanced_subset():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 7)
    largest = balanced_subset(labels)
    assert np.bincount(labels[largest]).tolist() == [3, 3, 3]
    assert np.all(np.diff(largest) > 0)
    np.testing.assert_array_equal(largest, balanced_subset(labels))  # fixed
    two = balanced_subset(labels, 2)
    assert np.bincount(labels[two]).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="the smallest class has 3; use at most 3"):
        balanced_subset(labels, 4)
    digits_test = load_dataset("digits", "test").y
    assert len(balanced_subset(digits_test)) == 430  # 43 per class, as documented


def test_partition_dispatches_on_the_spec():
    labels = np.repeat(np.arange(4), 25)
    for spec, direct in (
        ("iid", iid(100, 5, 7)),
        ("dirichlet:0.3", dirichlet(labels, 5, 0.3, 7)),
        ("shards:2", shards(labels, 5, 2, 7)),
    ):
        got = partition(spec, labels, 5, seed=7)
        assert all(np.array_equal(a, b) for a, b in zip(got, direct, strict=True))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: iid(10, 0), "num_nodes must be >= 1"),
        (lambda: iid(3, 4), "cannot give 4 nodes at least one item each from 3 items"),
        (lambda: iid(10, 2.0), "num_nodes must be an integer"),
        (lambda: dirichlet(np.zeros(10), 2, 0.0), "alpha must be a finite number > 0"),
        (lambda: dirichlet(np.zeros(10), 2, float("nan")), "alpha must be a finite number > 0"),
        (lambda: dirichlet(np.zeros(10), 3, 1.0, min_size=4), "at least 4 items each"),
        (lambda: dirichlet(np.zeros((2, 5)), 2, 1.0), "one-dimensional"),
        (lambda: shards(np.zeros(10), 2, 0), "classes_per_node must be >= 1"),
        (lambda: shards(np.zeros(10), 4, 3), "12 shards exceeds 10 items"),
    ],
)
def test_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_dirichlet_gives_up_with_a_clear_error():
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(ValueError, match=r"fewer than 2 items in 3 draws; raise alpha"):
        dirichlet(labels, 10, 0.01, seed=0, min_size=2, max_tries=3)
