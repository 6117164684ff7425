"""dirichlet-pool data: label probabilities, pooled batches, augmentation, the agents' files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from scipy.stats import chisquare

from edge_agent.learner import DataError, load_local_data
from edge_agent.learning import LABEL_PROBS
from models.training import BatchSampler
from toolkit.data import load_dataset
from toolkit.partition import dirichlet_pool, node_train_sets
from toolkit.simulate import augment_batch


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


def _label_counts(stream, batches: int, num_classes: int) -> np.ndarray:
    labels = torch.cat([y for _, y in itertools.islice(stream, batches)]).numpy()
    return np.bincount(labels, minlength=num_classes)


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of ``counts`` against ``probs``; classes expected < 5 times share a bin."""
    expected = probs * counts.sum()
    small = expected < 5
    observed_bins = np.append(counts[~small], counts[small].sum())
    expected_bins = np.append(expected[~small], expected[small].sum())
    keep = expected_bins > 0
    return float(chisquare(observed_bins[keep], expected_bins[keep]).pvalue)


def test_pooled_draws_follow_each_nodes_label_probabilities(digits):
    probs = dirichlet_pool(digits.y, 4, alpha=0.5, seed=1)
    sampler = BatchSampler(digits.x, digits.y, 64)
    for node, row in enumerate(probs):
        counts = _label_counts(sampler.pooled(row, np.random.default_rng(node)), 300, 10)
        assert counts.sum() == 300 * 64
        assert _chi_square_p(counts, row) > 1e-3, (node, counts, row)
        # a class of probability 0 never comes up
        assert np.all(counts[row == 0] == 0)
    # the test can tell two nodes apart: node 0's draws do not fit node 1's probabilities
    counts = _label_counts(sampler.pooled(probs[0], np.random.default_rng(0)), 300, 10)
    assert _chi_square_p(counts, probs[1]) < 1e-6


def test_pooled_items_of_a_label_are_uniform_and_come_from_the_whole_split(digits):
    one_hot = np.zeros(10)
    one_hot[3] = 1.0
    sampler = BatchSampler(digits.x, digits.y, 64)
    members = np.flatnonzero(digits.y == 3)
    # which items come up: the images identify them (no two digits images are equal here)
    lookup = {digits.x[i].tobytes(): i for i in members}
    drawn = [
        lookup[image.numpy().tobytes()]
        for x, _ in itertools.islice(sampler.pooled(one_hot, np.random.default_rng(5)), 200)
        for image in x
    ]
    counts = np.bincount(np.searchsorted(members, drawn), minlength=members.size)
    assert chisquare(counts).pvalue > 1e-3
    assert np.count_nonzero(counts) == members.size  # every item of the class, none other


def test_pooled_is_seeded_and_checks_its_probabilities(digits):
    probs = dirichlet_pool(digits.y, 1, alpha=0.5, seed=0)[0]
    sampler = BatchSampler(digits.x, digits.y, 8)

    def labels(seed: int) -> list[list[int]]:
        stream = sampler.pooled(probs, np.random.default_rng(seed))
        return [y.tolist() for _, y in itertools.islice(stream, 5)]

    assert labels(1) == labels(1) != labels(2)
    with pytest.raises(ValueError, match="one finite, non-negative"):
        next(sampler.pooled(np.array([0.5, -0.5] + [0.0] * 8), np.random.default_rng(0)))
    with pytest.raises(ValueError, match="all zero"):
        next(sampler.pooled(np.zeros(10), np.random.default_rng(0)))
    with pytest.raises(ValueError, match="has 5 classes"):
        next(sampler.pooled(np.full(5, 0.2), np.random.default_rng(0)))
    only_zeros = BatchSampler(digits.x, digits.y, 8, np.flatnonzero(digits.y == 0))
    with pytest.raises(ValueError, match=r"classes \[1\] a chance but no sample"):
        next(only_zeros.pooled(np.array([0.5, 0.5]), np.random.default_rng(0)))


def test_agent_data_of_a_pool_node_draws_with_its_probabilities(digits, tmp_path):
    sets = node_train_sets("dirichlet-pool:0.3", digits.x, digits.y, 3, seed=2)
    probs = dirichlet_pool(digits.y, 3, 0.3, seed=2)
    for node, tensors in enumerate(sets):
        assert tensors["x"].shape == digits.x.shape  # the whole split
        np.testing.assert_allclose(tensors[LABEL_PROBS], probs[node], rtol=1e-6)
    folder = tmp_path / "node1"
    folder.mkdir()
    save_file(sets[1], str(folder / "train.safetensors"))
    data = load_local_data(folder)
    np.testing.assert_allclose(data.label_probs, probs[1], rtol=1e-6)
    counts = _label_counts(data.batches(64, np.random.default_rng(0)), 200, 10)
    assert _chi_square_p(counts, probs[1]) > 1e-3
    # a split gives each node its own items and no probabilities
    split = node_train_sets("shards:2", digits.x, digits.y, 3, seed=0)
    assert sum(len(t["y"]) for t in split) == len(digits.y)
    assert all(LABEL_PROBS not in t for t in split)


def test_agent_refuses_probabilities_that_do_not_fit_its_labels(digits, tmp_path):
    tensors = {"x": digits.x[:40], "y": digits.y[:40], LABEL_PROBS: np.full(3, 1 / 3, np.float32)}
    save_file(tensors, str(tmp_path / "train.safetensors"))
    with pytest.raises(DataError, match="has 3 classes"):
        load_local_data(tmp_path)
    tensors[LABEL_PROBS] = np.full(10, -0.1, np.float32)
    save_file(tensors, str(tmp_path / "train.safetensors"))
    with pytest.raises(DataError, match=LABEL_PROBS):
        load_local_data(tmp_path)


def test_augment_shifts_by_whole_pixels_and_fills_with_black():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8) + 1.0
    same = augment_batch(x, torch.Generator().manual_seed(0), fill=-3.0, degrees=0, padding=0)
    torch.testing.assert_close(same, x)
    shifted = augment_batch(x, torch.Generator().manual_seed(0), fill=-3.0, degrees=0, padding=2)
    for image, moved in zip(x, shifted, strict=True):
        padded = torch.nn.functional.pad(image, (2, 2, 2, 2), value=-3.0)
        crops = [padded[:, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        assert any(torch.allclose(moved, crop, atol=1e-4) for crop in crops)
    assert not torch.equal(shifted, x)


def test_augment_rotates_a_little_and_is_seeded():
    x = torch.zeros(16, 1, 32, 32)
    x[:, :, 4:28, 15:17] = 1.0  # a vertical bar
    a = augment_batch(x, torch.Generator().manual_seed(3))
    b = augment_batch(x, torch.Generator().manual_seed(3))
    c = augment_batch(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x[:, :, 4:28, 15:17], torch.ones(16, 1, 24, 2))  # input untouched
    # the bar stays a bar: about the same ink, within a few pixels of where it was
    ink = a.sum(dim=(1, 2, 3))
    assert torch.all((ink - 48).abs() < 6)
    columns = a[:, 0].sum(dim=1)  # ink per column
    assert torch.all(columns[:, :10].sum(dim=1) < 1) and torch.all(columns[:, 22:].sum(dim=1) < 1)
    # and it is rotated: the top and bottom rows of the bar are no longer in the same columns
    assert (a[:, 0, 5].argmax(dim=1) != a[:, 0, 26].argmax(dim=1)).any()
