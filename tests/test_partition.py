"""Federated partitioners: coverage, determinism, label skew, spec parsing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.data import load_dataset
from toolkit.partition import (
    PartitionSpec,
    dirichlet,
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
    ],
)
def test_parse_partition(spec, expected):
    parsed = parse_partition(spec)
    assert parsed == expected
    assert parse_partition(str(parsed)) == parsed


@pytest.mark.parametrize(
    "spec",
    ["", "iid:2", "dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1", "dirichlet:abc",
     "dirichlet:nan", "dirichlet:inf", "shards", "shards:0", "shards:1.5", "shards:-2", "label:3"],
)  # fmt: skip
def test_parse_partition_errors_name_valid_forms(spec):
    with pytest.raises(ValueError, match=r"valid forms: iid, dirichlet:<alpha>, shards:"):
        parse_partition(spec)


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
