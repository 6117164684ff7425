"""Where on-device learning starts: the deployed model's own weights, when its artifact has them.

A packed artifact keeps only the signs and scales of a binary network, so ``export(...,
weights=True)`` ships the float training state too. A device's learner starts from it, resumes
a checkpoint learned from the same artifact, and drops one learned from another (a new deploy
restarts learning from the new model).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from agent_support import agent_config, online
from safetensors.numpy import load_file, save_file

import exporters
import models
from edge_agent.config import LearnSettings
from edge_agent.learner import DataError, Learner, load_local_data
from edge_agent.merge import merge
from edge_agent.state import StateStore
from exporters.artifact import verify_artifact
from models import training
from toolkit.data import load_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    folder = tmp_path_factory.mktemp("data")
    save_file({"x": train.x[:200], "y": train.y[:200]}, str(folder / "train.safetensors"))
    save_file({"x": test.x, "y": test.y}, str(folder / "test.safetensors"))
    return folder


@pytest.fixture(scope="module")
def trained(data_dir):
    """A LeNet-5 trained a little, so its accuracy is far from a fresh network's."""
    torch.manual_seed(0)
    model = models.create("lenet5")
    data = load_local_data(data_dir)
    optimizer = training.make_optimizer(model, "adam", 0.01, 0.0)
    sampler = training.BatchSampler(data.x_train, data.y_train, 32)
    steps = itertools.islice(sampler.fresh(np.random.default_rng(0)), 60)
    training.train_steps(model, optimizer, steps)
    return model.eval()


def _export(model, path, weights: bool):
    return exporters.export(
        model, path, "onnx-portable", name="digits", input_shape=(1, 32, 32), weights=weights
    )


def test_an_artifact_carries_its_float_weights_on_request(trained, tmp_path):
    plain = _export(trained, tmp_path / "plain", weights=False)
    learnable = _export(trained, tmp_path / "learnable", weights=True)
    manifest = verify_artifact(learnable)
    assert manifest["weights_file"] == "weights.safetensors" and "weights_file" not in (
        verify_artifact(plain)
    )
    assert "weights.safetensors" in manifest["files"]  # checksummed like the model
    shipped = load_file(learnable / "weights.safetensors")
    for name, value in training.state_to_numpy(trained).items():
        np.testing.assert_array_equal(shipped[name], value, err_msg=name)


def test_the_learner_starts_from_the_artifact_resumes_its_own_and_drops_a_stale_one(
    trained, data_dir, tmp_path
):
    spec, data = models.spec_of(trained), load_local_data(data_dir)
    weights = training.state_to_numpy(trained)
    settings = LearnSettings(local_steps=2)
    store = StateStore(tmp_path / "state")

    fresh = Learner(spec, data, settings, store, "pi-01", origin="a")
    given = Learner(spec, data, settings, store, "pi-01", origin="a", initial=weights)
    accuracy = training.evaluate(trained, data.x_test, data.y_test)["accuracy"]
    assert given.initial_accuracy == accuracy > fresh.initial_accuracy + 0.3
    given.finish_round(given.train_round(), merged=False)  # checkpoints round 1, origin a

    resumed = Learner(spec, data, settings, store, "pi-01", origin="a", initial=weights)
    assert resumed.round == 1
    for name, value in given.state().items():
        np.testing.assert_array_equal(resumed.state()[name], value, err_msg=name)
    other = Learner(spec, data, settings, store, "pi-01", origin="b", initial=weights)
    assert other.round == 0 and other.initial_accuracy == accuracy  # a new deploy restarts

    first = next(iter(weights))
    wrong = {**weights, first: weights[first][:1]}
    with pytest.raises(DataError, match="weights do not fit its network spec"):
        Learner(spec, data, settings, StateStore(tmp_path / "s2"), "pi-01", initial=wrong)


def test_a_device_learns_on_from_the_deployed_model(
    mosquitto, fleet, agents, key_file, trained, data_dir, tmp_path
):
    artifact = _export(trained, tmp_path / "art", weights=True)
    learning = LearnSettings(local_steps=2, rounds=2, round_interval_s=0.05)
    config = agent_config(
        mosquitto.url,
        key_file,
        tmp_path / "s",
        artifact=str(artifact),
        data_dir=str(data_dir),
        learning=learning,
    )
    agents(config)
    assert fleet.wait_for(online("pi-01"))
    assert fleet.command("pi-01", "learn.start")["ok"]
    data = load_local_data(data_dir)
    start = fleet.command("pi-01", "metrics")["result"]["rounds"][0]
    expected = training.evaluate(trained, data.x_test, data.y_test)["accuracy"]
    assert start["round"] == 0 and start["accuracy"] == pytest.approx(expected)


def test_the_learner_merges_with_the_vc_rule_it_is_given(trained, data_dir, tmp_path):
    spec, data = models.spec_of(trained), load_local_data(data_dir)
    weights = training.state_to_numpy(trained)
    rng = np.random.default_rng(0)
    other = {
        k: (v + rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v)
        for k, v in weights.items()
    }
    merged = {}
    for rule in ("bitfleet", "dfl2"):
        settings = LearnSettings(vc_rule=rule, trigger=1)
        learner = Learner(
            spec, data, settings, StateStore(tmp_path / rule), "pi-01", origin="a", initial=weights
        )
        own = learner.state()
        learner.receive("pi-02", other, 1.0)
        assert learner.merge()
        want = merge(own, [other], "vc", settings.self_weight, settings.variance, rule=rule)
        merged[rule] = learner.state()
        for name, value in want.items():
            np.testing.assert_allclose(merged[rule][name], value, rtol=1e-6, err_msg=name)
    # dfl2 leaves biases unrescaled: the two rules give different models
    assert any(not np.allclose(merged["bitfleet"][k], merged["dfl2"][k]) for k in merged["dfl2"])
