"""models.training: batch sampling, evaluation and numpy state (trainer, simulator, agent)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import models
from models.training import BatchSampler, evaluate, load_numpy_state, state_to_numpy

N = 23


def indexed(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Samples that carry their own index (x) and a label derived from it (y)."""
    return np.arange(n, dtype=np.float32).reshape(n, 1), np.arange(n, dtype=np.int64) % 3


def sampler(batch_size: int, indices=None) -> BatchSampler:
    return BatchSampler(*indexed(), batch_size, indices)


def drawn(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    x, y = batch
    index = x[:, 0].long()
    assert torch.equal(y, index % 3)  # images and labels stay paired
    return index.tolist()


def take(batches, count: int) -> list[list[int]]:
    return [drawn(b) for b in itertools.islice(batches, count)]


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        sampler(0)


# ----------------------------------------------------------------------------- epoch order


def test_epoch_covers_every_sample_once():
    batches = [drawn(b) for b in sampler(5).epoch(seed=1, epoch=0)]
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]  # the last batch is short
    order = list(itertools.chain(*batches))
    assert sorted(order) == list(range(N))
    assert order != list(range(N))  # shuffled


def test_epoch_is_seeded_by_seed_and_epoch_alone():
    def order(seed: int, epoch: int) -> list[int]:
        return list(itertools.chain(*map(drawn, sampler(4).epoch(seed, epoch))))

    assert order(0, 3) == order(0, 3)  # a resumed run sees the same epoch 3
    assert order(0, 3) != order(0, 4)
    assert order(0, 3) != order(1, 3)
    # torch tensors give the same batches as numpy arrays
    x, y = indexed()
    tensors = BatchSampler(torch.from_numpy(x), torch.from_numpy(y), 4).epoch(0, 3)
    assert list(itertools.chain(*map(drawn, tensors))) == order(0, 3)


def test_epoch_over_a_subset():
    subset = np.array([2, 3, 5, 7, 11, 13])
    order = list(itertools.chain(*map(drawn, sampler(4, subset).epoch(0, 0))))
    assert sorted(order) == subset.tolist()
    assert list(sampler(4, np.array([], np.int64)).epoch(0, 0)) == []


# --------------------------------------------------------------------------- endless order


def test_endless_reshuffles_every_pass():
    stream = sampler(5).endless(np.random.default_rng(0))
    passes = []
    for _ in range(3):  # 23 // 5 = 4 full batches a pass; the short remainder is dropped
        batches = take(stream, 4)
        assert all(len(b) == 5 for b in batches)
        flat = list(itertools.chain(*batches))
        assert len(set(flat)) == 20  # no sample twice within a pass
        passes.append(flat)
    assert passes[0] != passes[1] != passes[2]


def test_endless_follows_the_generator_and_the_shard():
    shard = np.array([4, 8, 15, 16, 22])
    first = take(sampler(2, shard).endless(np.random.default_rng(5)), 6)
    assert first == take(sampler(2, shard).endless(np.random.default_rng(5)), 6)
    assert set(itertools.chain(*first)) <= set(shard.tolist())
    # a batch larger than the shard takes the whole shard, reshuffled each time
    whole = take(sampler(64, shard).endless(np.random.default_rng(0)), 3)
    assert all(sorted(b) == shard.tolist() for b in whole)
    assert len({tuple(b) for b in whole}) > 1
    with pytest.raises(ValueError, match="no samples"):
        sampler(4, np.array([], np.int64)).endless(np.random.default_rng(0))


# ----------------------------------------------------------------------------- fresh order


def test_fresh_draws_without_repeats_one_choice_per_batch():
    rng = np.random.default_rng(9)
    batches = take(sampler(8).fresh(rng), 50)
    assert all(len(b) == 8 and len(set(b)) == 8 for b in batches)
    assert len({tuple(b) for b in batches}) > 1
    # exactly one rng.choice per batch, made on demand: a generator shared with other uses
    # (the agent picks peers with it) continues where a reference draw would
    reference = np.random.default_rng(9)
    assert batches == [reference.choice(N, size=8, replace=False).tolist() for _ in range(50)]
    assert rng.random() == reference.random()


def test_fresh_on_small_data_and_a_subset():
    subset = np.array([1, 6, 9])
    batches = take(sampler(32, subset).fresh(np.random.default_rng(0)), 5)
    assert all(sorted(b) == subset.tolist() for b in batches)  # min(batch_size, samples)
    with pytest.raises(ValueError, match="no samples"):
        sampler(4, np.array([], np.int64)).fresh(np.random.default_rng(0))


# ------------------------------------------------------------------------------ evaluation


def identity_classifier() -> nn.Module:
    linear = nn.Linear(2, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2))
        linear.bias.zero_()
    # dropout that would wreck the logits if evaluate forgot eval mode
    return nn.Sequential(nn.Dropout(p=0.999), linear)


def test_evaluate_hand_example_in_eval_mode():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])
    model = identity_classifier()
    model.train()
    result = evaluate(model, x, y, batch_size=3)
    # predictions 0, 1, 0, 1: three right; cross-entropy log(1 + e^-m) for logit margin m
    assert result["accuracy"] == 0.75
    assert result["samples"] == 4
    margin_loss = lambda m: math.log1p(math.exp(-m))  # noqa: E731
    assert result["loss"] == pytest.approx((3 * margin_loss(1.0) + margin_loss(-1.0)) / 4)
    assert model.training  # mode restored
    model.eval()
    whole = evaluate(model, x.numpy(), y.numpy())  # numpy in, one batch
    assert whole == result | {"loss": pytest.approx(result["loss"])}
    assert not model.training
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, x[:0], y[:0])


def test_evaluate_restores_mode_after_an_error():
    model = identity_classifier()
    model.train()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        evaluate(model, torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    assert model.training


# ----------------------------------------------------------------------------- numpy state


def test_numpy_state_round_trips_exactly():
    torch.manual_seed(0)
    source = models.create("bireal18", width=0.125, stem="imagenet", num_classes=4)
    source.train()
    with torch.no_grad():
        source(torch.randn(2, 3, 32, 32))  # move batch-norm statistics and counters
    state = state_to_numpy(source)
    assert set(state) == set(source.state_dict())
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters and all(state[k].dtype == np.int64 and state[k] == 1 for k in counters)

    torch.manual_seed(1)
    target = models.create("bireal18", width=0.125, stem="imagenet", num_classes=4)
    frozen = {k: v.copy() for k, v in state.items()}
    for array in frozen.values():
        array.flags.writeable = False  # decoded frames and memory maps are read-only
    load_numpy_state(target, frozen)
    for name, tensor in target.state_dict().items():
        assert tensor.dtype == source.state_dict()[name].dtype
        assert torch.equal(tensor, source.state_dict()[name]), name
    # copies both ways: the model shares memory with neither dict
    name = next(k for k in state if k.endswith(".weight"))
    state[name][...] = 7.0
    assert not torch.equal(source.state_dict()[name], torch.from_numpy(state[name]))
    with torch.no_grad():
        target.state_dict()[name].zero_()
    assert frozen[name].any()


def test_load_numpy_state_is_strict():
    model = identity_classifier()
    state = state_to_numpy(model)
    del state["1.bias"]
    with pytest.raises(RuntimeError, match="1.bias"):
        load_numpy_state(model, state)
