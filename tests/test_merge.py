"""edge_agent.merge: averaging and variance-corrected averaging on hand-made numbers."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.merge import (
    EPS,
    MergeError,
    Merger,
    is_rescaled,
    merge,
    tensor_variance,
    weighted_average,
)

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# A hand-computed example.
#
#   own   w = [0, 1, 2]  var 1        b = [1.0]
#   r1    w = [0, 3, 6]  var 9        b = [3.0]
#   r2    w = [2, 2, 8]  var 12       b = [5.0]
#   mean(received) w = [1, 2.5, 7]
#   mix (self_weight 0.5)  w = [0.5, 1.75, 4.5], mean 2.25, var (1.75^2 + 0.5^2 + 2.25^2) / 2
#                                                              = 8.375 / 2 = 4.1875
#   targets: others (9 + 12) / 2 = 10.5; self 1; conservative 0.5 * 1 + 0.5 * 10.5 = 5.75
# ---------------------------------------------------------------------------------------------


def example() -> tuple[dict, list[dict]]:
    own = {
        "w": np.array([0.0, 1.0, 2.0]),
        "b": np.array([1.0]),
        "bn.running_mean": np.array([0.1, 0.2], dtype=np.float32),
        "bn.running_var": np.array([1.5, 2.5], dtype=np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "counts": np.array([1, 2, 3], dtype=np.int32),
    }
    r1 = {
        "w": np.array([0.0, 3.0, 6.0]),
        "b": np.array([3.0]),
        "bn.running_mean": np.array([9.0, 9.0], dtype=np.float32),
        "bn.running_var": np.array([9.0, 9.0], dtype=np.float32),
        "bn.num_batches_tracked": np.array(100, dtype=np.int64),
        "counts": np.array([2, 2, 2], dtype=np.int32),
    }
    r2 = {
        "w": np.array([2.0, 2.0, 8.0]),
        "b": np.array([5.0]),
        "bn.running_mean": np.array([-9.0, -9.0], dtype=np.float32),
        "bn.running_var": np.array([4.0, 4.0], dtype=np.float32),
        "bn.num_batches_tracked": np.array(200, dtype=np.int64),
        "counts": np.array([4, 4, 4], dtype=np.int32),
    }
    return own, [r1, r2]


MIX_W = np.array([0.5, 1.75, 4.5])
MIX_MEAN, MIX_VAR = 2.25, 4.1875


def rescaled(target: float) -> np.ndarray:
    return (MIX_W - MIX_MEAN) * math.sqrt((target + 1e-4) / (MIX_VAR + 1e-4)) + MIX_MEAN


def test_hand_example_mix_and_variance_of_mix():
    assert np.mean(MIX_W) == MIX_MEAN
    assert np.var(MIX_W, ddof=1) == pytest.approx(MIX_VAR, rel=1e-15)


def test_avg_hand_example():
    own, received = example()
    out = merge(own, received, method="avg", self_weight=0.5)
    np.testing.assert_allclose(out["w"], [0.5, 1.75, 4.5], rtol=1e-15)
    np.testing.assert_allclose(out["b"], [2.5], rtol=1e-15)  # 0.5 * 1 + 0.5 * (3 + 5) / 2
    # integers: 0.5 * [1, 2, 3] + 0.5 * [3, 3, 3] = [2, 2.5, 3] -> rounded half to even
    np.testing.assert_array_equal(out["counts"], [2, 2, 3])
    assert out["counts"].dtype == np.int32


@pytest.mark.parametrize(
    ("variance", "target"),
    [("others", 10.5), ("self", 1.0), ("conservative", 5.75)],
)
def test_vc_hand_example(variance, target):
    own, received = example()
    out = merge(own, received, method="vc", self_weight=0.5, variance=variance)
    np.testing.assert_allclose(out["w"], rescaled(target), rtol=1e-13)
    # mean is kept, variance is moved to the target (up to eps)
    assert np.mean(out["w"]) == pytest.approx(MIX_MEAN, rel=1e-14)
    expected_var = MIX_VAR * (target + EPS) / (MIX_VAR + EPS)
    assert np.var(out["w"], ddof=1) == pytest.approx(expected_var, rel=1e-12)
    # single-element tensors are averaged, never rescaled
    np.testing.assert_allclose(out["b"], [2.5], rtol=1e-15)
    np.testing.assert_array_equal(out["counts"], [2, 2, 3])


def test_conservative_uses_own_variance_before_mixing():
    # DFL_torch would use var(mix) = 4.1875 as the "own" part; bitfleet uses var(own) = 1.
    own, received = example()
    out = merge(own, received, variance="conservative", self_weight=0.25)
    target = 0.25 * 1.0 + 0.75 * 10.5
    mix = 0.25 * own["w"] + 0.75 * np.array([1.0, 2.5, 7.0])
    m, v = mix.mean(), np.var(mix, ddof=1)
    expected = (mix - m) * math.sqrt((target + EPS) / (v + EPS)) + m
    np.testing.assert_allclose(out["w"], expected, rtol=1e-13)


def test_weighted_mean_with_sample_counts():
    own, received = example()
    # weights 3:1 -> received mean w = 0.75 * [0,3,6] + 0.25 * [2,2,8] = [0.5, 2.75, 6.5]
    out = merge(own, received, method="avg", self_weight=0.5, weights=[300, 100])
    np.testing.assert_allclose(out["w"], [0.25, 1.875, 4.25], rtol=1e-15)
    np.testing.assert_allclose(out["b"], [0.5 * 1 + 0.5 * (0.75 * 3 + 0.25 * 5)], rtol=1e-15)
    # variance target is the weighted mean of variances: 0.75 * 9 + 0.25 * 12 = 9.75
    out = merge(own, received, method="vc", self_weight=0.5, weights=[3, 1])
    mix, mean, var = np.array([0.25, 1.875, 4.25]), 2.125, 8.09375 / 2
    expected = (mix - mean) * math.sqrt((9.75 + EPS) / (var + EPS)) + mean
    np.testing.assert_allclose(out["w"], expected, rtol=1e-13)


def test_equal_weights_are_the_default():
    own, received = example()
    a = merge(own, received, weights=None)
    b = merge(own, received, weights=[2.0, 2.0])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# ---------------------------------------------------------------------------------------------
# weighted_average: FedAvg's server, every tensor averaged (batch-norm statistics included)
# ---------------------------------------------------------------------------------------------


def test_weighted_average_hand_example():
    own, (r1, r2) = example()
    out = weighted_average([own, r1, r2], [2, 1, 1])
    # w: 0.5 * [0, 1, 2] + 0.25 * [0, 3, 6] + 0.25 * [2, 2, 8]
    np.testing.assert_allclose(out["w"], [0.5, 1.75, 4.5], rtol=1e-15)
    np.testing.assert_allclose(out["b"], [0.5 * 1 + 0.25 * 3 + 0.25 * 5], rtol=1e-15)
    # running statistics are averaged too, unlike merge(), which keeps the own ones
    np.testing.assert_allclose(out["bn.running_mean"], [0.05, 0.1], rtol=1e-6)
    np.testing.assert_allclose(out["bn.running_var"], [0.75 + 2.25 + 1.0, 1.25 + 2.25 + 1.0])
    # counters: 0.5 * 7 + 0.25 * 100 + 0.25 * 200 = 78.5, rounded half to even
    assert out["bn.num_batches_tracked"] == 78
    # [0.5, 1, 1.5] + [0.5, 0.5, 0.5] + [1, 1, 1] = [2, 2.5, 3]
    np.testing.assert_array_equal(out["counts"], [2, 2, 3])
    assert list(out) == list(own)
    assert all(out[k].dtype == own[k].dtype for k in own)


def test_weighted_average_weights_by_samples():
    a = {"w": np.array([0.0, 2.0], np.float32), "n": np.array(2, np.int64)}
    b = {"w": np.array([4.0, 6.0], np.float32), "n": np.array(4, np.int64)}
    out = weighted_average([a, b], [3, 1])
    np.testing.assert_allclose(out["w"], [1.0, 3.0])
    assert out["w"].dtype == np.float32
    assert out["n"] == 2 and out["n"].dtype == np.int64  # 2.5 rounds half to even
    equal = weighted_average([a, b])
    np.testing.assert_allclose(equal["w"], [2.0, 4.0])
    assert equal["n"] == 3


def test_weighted_average_of_one_model_is_that_model():
    own, _ = example()
    out = weighted_average([own], [5])
    for name in own:
        np.testing.assert_array_equal(out[name], own[name])
        assert out[name] is not own[name]


def test_weighted_average_errors():
    own, received = example()
    with pytest.raises(ValueError, match="at least one model"):
        weighted_average([])
    with pytest.raises(ValueError, match="positive"):
        weighted_average([own, *received], [1, 0, 1])
    with pytest.raises(ValueError, match="got 2 weights"):
        weighted_average([own, *received], [1, 1])
    del received[1]["b"]
    with pytest.raises(MergeError, match=r"model 2 .*missing \['b'\]"):
        weighted_average([own, *received])


def test_self_weight_zero_ignores_own_values():
    own, received = example()
    out = merge(own, received, method="avg", self_weight=0.0)
    np.testing.assert_allclose(out["w"], [1.0, 2.5, 7.0])


@pytest.mark.parametrize("method", ["avg", "vc"])
def test_batch_norm_statistics_keep_own_values(method):
    own, received = example()
    out = merge(own, received, method=method)
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        np.testing.assert_array_equal(out[name], own[name])
        assert out[name].dtype == own[name].dtype
        assert out[name] is not own[name]  # a copy, not an alias


def test_output_dtypes_and_order_follow_own():
    own, received = example()
    own["w"] = own["w"].astype(np.float32)
    own["h"] = np.arange(6, dtype=np.float16).reshape(2, 3)
    for r in received:
        r["h"] = np.ones((2, 3), dtype=np.float16)
    out = merge(own, received)
    assert list(out) == list(own)
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in own.items()}
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in own.items()}


# ---------------------------------------------------------------------------------------------
# Variance restoration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance", ["others", "self", "conservative"])
def test_vc_restores_target_variance(variance):
    rng = np.random.default_rng(0)
    own = {"w": rng.normal(0.3, 5.0, (64, 32))}
    received = [{"w": rng.normal(-1.0, s, (64, 32))} for s in (10.0, 20.0, 30.0)]
    v_own = np.var(own["w"], ddof=1)
    v_others = np.mean([np.var(r["w"], ddof=1) for r in received])
    target = {"others": v_others, "self": v_own, "conservative": 0.3 * v_own + 0.7 * v_others}
    out = merge(own, received, self_weight=0.3, variance=variance)
    mix = 0.3 * own["w"] + 0.7 * np.mean([r["w"] for r in received], axis=0)
    v_mix = np.var(mix, ddof=1)
    expected = v_mix * (target[variance] + EPS) / (v_mix + EPS)  # eps-exact
    assert np.var(out["w"], ddof=1) == pytest.approx(expected, rel=1e-9)
    assert np.var(out["w"], ddof=1) == pytest.approx(target[variance], rel=1e-5)  # large vars
    assert np.mean(out["w"]) == pytest.approx(np.mean(mix), rel=1e-9)


def lenet5_shapes() -> dict[str, tuple[int, ...]]:
    return {
        "features.0.weight": (6, 1, 5, 5),
        "features.0.bias": (6,),
        "features.3.weight": (16, 6, 5, 5),
        "features.3.bias": (16,),
        "classifier.0.weight": (120, 400),
        "classifier.0.bias": (120,),
        "classifier.2.weight": (84, 120),
        "classifier.2.bias": (84,),
        "classifier.4.weight": (10, 84),
        "classifier.4.bias": (10,),
    }


def xavier_lenet5(rng: np.random.Generator) -> dict[str, np.ndarray]:
    model = {}
    for name, shape in lenet5_shapes().items():
        if name.endswith("weight"):
            receptive = int(np.prod(shape[2:]))
            fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
            std = math.sqrt(2.0 / (fan_in + fan_out))
            model[name] = rng.normal(0.0, std, shape).astype(np.float32)
        else:
            model[name] = rng.uniform(-0.05, 0.05, shape).astype(np.float32)
    return model


def test_vanishing_variance_avg_shrinks_and_vc_keeps():
    rng = np.random.default_rng(42)
    n = 8
    own, *received = [xavier_lenet5(rng) for _ in range(n)]
    before = [tensor_variance(m) for m in received]
    avg = merge(own, received, method="avg", self_weight=1 / n)
    vc = merge(own, received, method="vc", self_weight=1 / n, variance="others")
    v_avg, v_vc = tensor_variance(avg), tensor_variance(vc)
    assert set(v_avg) == set(lenet5_shapes())
    for name in v_avg:
        target = float(np.mean([b[name] for b in before]))
        expected = v_avg[name] * (target + EPS) / (v_avg[name] + EPS)  # the avg tensor rescaled
        assert v_vc[name] == pytest.approx(expected, rel=1e-5), name  # float32 output
        if name.endswith("weight"):  # the biases are too small (6 to 120 values) to be tidy
            ratio = v_avg[name] / target
            assert 0.6 / n < ratio < 1.5 / n, (name, ratio)  # ~1/N: variance vanishes
            # kept: eps = 1e-4 is not small against var / N ~ 5e-4 here, so the restored
            # variance is 84-95% of the target (the eps-exact check above is the precise one)
            assert 0.8 * target < v_vc[name] < 1.0 * target, name


# ---------------------------------------------------------------------------------------------
# Determinism and dict-order independence
# ---------------------------------------------------------------------------------------------

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
names = st.text(alphabet="abcdefgh._", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    layout=st.dictionaries(names, shapes, min_size=1, max_size=6),
    n_received=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    method=st.sampled_from(["avg", "vc"]),
    variance=st.sampled_from(["others", "self", "conservative"]),
    data=st.data(),
)
def test_same_input_same_output_independent_of_dict_order(
    layout, n_received, seed, method, variance, data
):
    rng = np.random.default_rng(seed)

    def model() -> dict[str, np.ndarray]:
        return {k: rng.normal(0.0, 1.0, s).astype(np.float32) for k, s in layout.items()}

    own, received = model(), [model() for _ in range(n_received)]
    weights = [float(x) for x in rng.uniform(0.5, 5.0, n_received)]
    kwargs = dict(method=method, variance=variance, self_weight=0.3, weights=weights)
    reference = merge(own, received, **kwargs)

    def shuffled(m: dict) -> dict:
        order = data.draw(st.permutations(sorted(m)))
        return {k: m[k] for k in order}

    again = merge(shuffled(own), [shuffled(r) for r in received], **kwargs)
    assert set(again) == set(reference)
    for k in reference:
        assert again[k].dtype == reference[k].dtype
        np.testing.assert_array_equal(again[k], reference[k])


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_missing_and_extra_names_raise():
    own, received = example()
    del received[1]["b"]
    received[1]["surprise"] = np.zeros(2)
    with pytest.raises(
        MergeError, match=r"received model 1 .*missing \['b'\].*extra \['surprise'\]"
    ):
        merge(own, received)


def test_mismatched_shape_raises():
    own, received = example()
    received[0]["w"] = np.zeros((3, 1))
    with pytest.raises(MergeError, match=r"'w' has shape \(3, 1\) in received model 0 but \(3,\)"):
        merge(own, received)


def test_merge_error_is_a_value_error():
    assert issubclass(MergeError, ValueError)


def test_unsupported_dtype_raises():
    own = {"z": np.array([1 + 1j, 2 + 0j])}
    with pytest.raises(MergeError, match="'z' has unsupported dtype complex128"):
        merge(own, [own])


def test_bad_arguments_raise():
    own, received = example()
    with pytest.raises(ValueError, match="at least one received model"):
        merge(own, [])
    with pytest.raises(ValueError, match="unknown merge method 'mean'; valid: avg, vc"):
        merge(own, received, method="mean")
    with pytest.raises(ValueError, match="valid: others, self, conservative"):
        merge(own, received, variance="mine")
    for sw in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="self_weight"):
            merge(own, received, self_weight=sw)
    with pytest.raises(ValueError, match="2 received models"):
        merge(own, received, weights=[1.0])
    for bad in ([1.0, 0.0], [1.0, -2.0], [1.0, float("inf")]):
        with pytest.raises(ValueError, match="positive"):
            merge(own, received, weights=bad)


def test_is_rescaled():
    assert is_rescaled("conv.weight", np.zeros((2, 2), np.float32))
    assert is_rescaled("fc.bias", np.zeros(2))
    assert not is_rescaled("fc.bias", np.zeros(1))
    assert not is_rescaled("scale", np.float32(2.0))
    assert not is_rescaled("bn.running_mean", np.zeros(4))
    assert not is_rescaled("bn.running_var", np.ones(4))
    assert not is_rescaled("bn.num_batches_tracked", np.array(3))
    assert not is_rescaled("counts", np.arange(4))
    own, _ = example()
    assert set(tensor_variance(own)) == {"w"}
    assert tensor_variance(own)["w"] == 1.0


# ---------------------------------------------------------------------------------------------
# Merger
# ---------------------------------------------------------------------------------------------


def test_merger_trigger_k():
    own, (r1, r2) = example()
    merger = Merger(method="vc", trigger=2)
    assert not merger.ready and merger.pending == 0
    assert merger.merge_into(own) is None
    merger.add("b", r2)
    assert not merger.ready and merger.pending == 1
    assert merger.merge_into(own) is None
    assert merger.pending == 1
    merger.add("a", r1)
    assert merger.ready
    out = merger.merge_into(own)
    assert out is not None
    np.testing.assert_allclose(out["w"], rescaled(10.5), rtol=1e-13)
    assert merger.pending == 0 and not merger.ready
    assert merger.merge_into(own) is None


def test_merger_newer_model_from_same_sender_replaces_older():
    own, (r1, r2) = example()
    merger = Merger(method="avg", self_weight=0.5, trigger=2)
    merger.add("a", r2, weight=5.0)
    merger.add("a", r1)
    assert merger.pending == 1 and not merger.ready
    merger.add("b", r2)
    out = merger.merge_into(own)
    np.testing.assert_allclose(out["w"], [0.5, 1.75, 4.5], rtol=1e-15)


def test_merger_trigger_all_and_weights():
    own, (r1, r2) = example()
    merger = Merger(method="vc", trigger="all", neighbours=["pi-1", "pi-2"])
    merger.add("pi-2", r2, weight=100)
    assert not merger.ready
    merger.add("pi-1", r1, weight=300)
    assert merger.ready and merger.senders == ("pi-1", "pi-2")
    out = merger.merge_into(own)
    np.testing.assert_array_equal(out["w"], merge(own, [r1, r2], weights=[3, 1])["w"])
    assert merger.pending == 0


def test_no_rescale_names_are_averaged_but_keep_the_mixed_scale():
    """Binary layers' latent weights: VC averages them like avg does, and leaves their scale."""
    own, received = example()
    own["c"], received[0]["c"], received[1]["c"] = (
        np.array(v) for v in ([0.0, 2.0], [1.0, 5.0], [3.0, 3.0])
    )
    plain = merge(own, received, method="avg")
    vc = merge(own, received, method="vc", no_rescale={"w"})
    np.testing.assert_allclose(vc["w"], MIX_W)  # the mix, not rescaled
    np.testing.assert_allclose(vc["w"], plain["w"])
    assert not np.allclose(vc["c"], plain["c"])  # other tensors are still corrected
    np.testing.assert_array_equal(vc["c"], merge(own, received, method="vc")["c"])
    merger = Merger(method="vc", trigger=2, no_rescale=["w"])
    merger.add("pi-1", received[0])
    merger.add("pi-2", received[1])
    np.testing.assert_array_equal(merger.merge_into(own)["w"], vc["w"])


def test_merger_result_independent_of_arrival_order():
    own, (r1, r2) = example()
    m1, m2 = Merger(trigger=2), Merger(trigger=2)
    m1.add("x", r1, weight=2)
    m1.add("y", r2)
    m2.add("y", r2)
    m2.add("x", r1, weight=2)
    a, b = m1.merge_into(own), m2.merge_into(own)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_merger_clear_discard_and_errors():
    own, (r1, r2) = example()
    merger = Merger(trigger=1)
    merger.add("a", r1)
    merger.clear()
    assert merger.pending == 0 and merger.merge_into(own) is None
    bad = dict(r2, w=np.zeros(5))
    merger.add("bad", bad)
    with pytest.raises(MergeError, match="'w' has shape \\(5,\\) in model from 'bad'"):
        merger.merge_into(own)
    assert merger.pending == 1  # left for the caller to discard
    assert merger.discard("bad") and not merger.discard("bad")
    with pytest.raises(ValueError, match="needs a non-empty neighbours"):
        Merger(trigger="all")
    with pytest.raises(ValueError, match="can never be reached"):
        Merger(trigger=3, neighbours=["a", "b"])
    for trigger in (0, -1, True, "some"):
        with pytest.raises(ValueError, match="trigger must be"):
            Merger(trigger=trigger)
    with pytest.raises(ValueError, match="valid: avg, vc"):
        Merger(method="fedprox")
    with pytest.raises(ValueError, match="self_weight"):
        Merger(self_weight=1.0)
    neighbourly = Merger(neighbours=["a"])
    with pytest.raises(ValueError, match="'z' is not a neighbour"):
        neighbourly.add("z", r1)
    with pytest.raises(ValueError, match="weight must be positive"):
        neighbourly.add("a", r1, weight=0)


# ---------------------------------------------------------------------------------------------
# Real models, and the device-side import contract
# ---------------------------------------------------------------------------------------------


def test_merge_torch_lenet5_state_dict():
    import torch

    import models

    def numpy_state(seed: int) -> dict[str, np.ndarray]:
        torch.manual_seed(seed)
        m = models.create("lenet5")
        return {k: v.numpy() for k, v in m.state_dict().items()}

    own, *received = [numpy_state(s) for s in range(4)]
    out = merge(own, received, method="vc", self_weight=0.5, variance="others")
    assert list(out) == list(own)
    assert all(out[k].dtype == np.float32 and out[k].shape == own[k].shape for k in own)
    target = models.create("lenet5")
    target.load_state_dict({k: torch.from_numpy(v) for k, v in out.items()})
    for name, v in tensor_variance(out).items():
        expected = np.mean([np.var(r[name], ddof=1, dtype=np.float64) for r in received])
        mix = 0.5 * own[name].astype(np.float64) + 0.5 * np.mean(
            [r[name].astype(np.float64) for r in received], axis=0
        )
        v_mix = np.var(mix, ddof=1)
        assert v == pytest.approx(v_mix * (expected + EPS) / (v_mix + EPS), rel=1e-5), name
        torch_var = torch.var(torch.from_numpy(out[name]).double()).item()  # ddof=1, as torch
        assert torch_var == pytest.approx(v, rel=1e-12)


def test_import_does_not_load_torch():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = "import sys, edge_agent.merge; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# The two rescaling rules (rule=), by hand. Population variances (ddof 0) of the example's w:
#   own [0, 1, 2]: 2/3;  r1 [0, 3, 6]: 6;  r2 [2, 2, 8]: 8;  target others (6 + 8) / 2 = 7
#   mix [0.5, 1.75, 4.5], mean 2.25, population variance 8.375 / 3
# A two-element bias:  own [0, 2], r1 [1, 5], r2 [3, 3] -> mix (self weight 0.5) [1, 3]
#   sample variances (ddof 1): r1 8, r2 0 -> target 4; mix 2
# ---------------------------------------------------------------------------------------------


def rules_example() -> tuple[dict, list[dict]]:
    own, (r1, r2) = example()
    for model, bias in zip((own, r1, r2), ([0.0, 2.0], [1.0, 5.0], [3.0, 3.0]), strict=True):
        model["conv.weight"] = model.pop("w")
        model["fc.bias"] = np.array(bias)
    return own, [r1, r2]


def test_dfl2_rule_hand_example():
    own, received = rules_example()
    out = merge(own, received, method="vc", self_weight=0.5, rule="dfl2")
    expected = (MIX_W - MIX_MEAN) * math.sqrt(7.0 / (8.375 / 3)) + MIX_MEAN
    np.testing.assert_allclose(out["conv.weight"], expected, rtol=1e-13)
    assert np.var(out["conv.weight"]) == pytest.approx(7.0, rel=1e-13)  # exactly, no eps
    np.testing.assert_allclose(out["fc.bias"], [1.0, 3.0], rtol=1e-15)  # averaged only
    # conservative: 0.5 * (2/3) + 0.5 * 7, population variances too
    out = merge(own, received, method="vc", self_weight=0.5, variance="conservative", rule="dfl2")
    target = 0.5 * (2 / 3) + 0.5 * 7.0
    expected = (MIX_W - MIX_MEAN) * math.sqrt(target / (8.375 / 3)) + MIX_MEAN
    np.testing.assert_allclose(out["conv.weight"], expected, rtol=1e-13)


def test_bitfleet_rule_hand_example_and_default():
    own, received = rules_example()
    out = merge(own, received, method="vc", self_weight=0.5, rule="bitfleet")
    np.testing.assert_allclose(out["conv.weight"], rescaled(10.5), rtol=1e-13)
    bias = (np.array([1.0, 3.0]) - 2.0) * math.sqrt((4.0 + EPS) / (2.0 + EPS)) + 2.0
    np.testing.assert_allclose(out["fc.bias"], bias, rtol=1e-13)  # biases rescaled too
    default = merge(own, received, method="vc", self_weight=0.5)
    assert all(np.array_equal(default[k], out[k]) for k in out)  # bitfleet is the default


def test_dfl2_leaves_a_mix_without_spread_alone():
    own = {"w": np.array([1.0, 1.0]), "v": np.array([0.0, 2.0])}
    other = {"w": np.array([3.0, 3.0]), "v": np.array([2.0, 0.0])}
    out = merge(own, [other], method="vc", self_weight=0.5, rule="dfl2")
    np.testing.assert_array_equal(out["w"], [2.0, 2.0])
    np.testing.assert_array_equal(out["v"], [1.0, 1.0])  # no spread left: nothing to stretch
    assert np.all(np.isfinite(out["v"]))


def test_merger_passes_its_rule():
    own, received = rules_example()
    merger = Merger(method="vc", self_weight=0.5, trigger=2, rule="dfl2")
    merger.add("a", received[0])
    merger.add("b", received[1])
    out = merger.merge_into(own)
    expected = merge(own, received, method="vc", self_weight=0.5, rule="dfl2")
    assert all(np.array_equal(out[k], expected[k]) for k in expected)
    assert "rule='dfl2'" in repr(merger)
    with pytest.raises(ValueError, match="unknown rescaling rule 'foo'; valid: bitfleet, dfl2"):
        Merger(rule="foo")
    with pytest.raises(ValueError, match="unknown rescaling rule 'DFL2'"):
        merge(own, received, rule="DFL2")
