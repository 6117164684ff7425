import itertools

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from models.training import BatchSampler, make_optimizer, train_steps
from toolkit.cli import app
from toolkit.data import load_dataset
from toolkit.simulate import SimulationConfig, simulate
from toolkit.train import make_model

SMALL = dict(nodes=4, topology="ring", rounds=2, local_steps=2, batch_size=16)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown merge method 'median'"):
        SimulationConfig(merge="median")
    with pytest.raises(ValueError, match="unknown codec"):
        SimulationConfig(codec="zip")
    with pytest.raises(ValueError, match="drop must be in"):
        SimulationConfig(drop=1.0)
    with pytest.raises(ValueError, match="trigger"):
        SimulationConfig(trigger=0)


def test_same_seed_same_history():
    a = simulate(SimulationConfig(**SMALL, seed=3))
    b = simulate(SimulationConfig(**SMALL, seed=3))
    c = simulate(SimulationConfig(**SMALL, seed=4))
    assert a.history == b.history
    assert a.history != c.history
    assert [r["round"] for r in a.history] == [0, 1, 2]


def test_fedavg_with_one_node_equals_local_training():
    config = SimulationConfig(
        nodes=1,
        merge="fedavg",
        init="common",
        rounds=3,
        local_steps=4,
        batch_size=16,
        data="iid",
        seed=5,
    )
    result = simulate(config)
    train = load_dataset("digits", "train")
    torch.manual_seed(config.seed)
    model = make_model("lenet5", train)
    optimizer = make_optimizer(model, "sgd", config.lr, 0.0)
    stream = BatchSampler(train.x, train.y, 16).endless(np.random.default_rng(config.seed * 7_919))
    train_steps(model, optimizer, itertools.islice(stream, 12))
    expected = {k: v.numpy() for k, v in model.state_dict().items()}
    got = result.final_states[0]
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_vc_beats_plain_averaging_at_independent_init():
    # the vanishing-variance effect in miniature: 8 nodes, independent initialisation
    setup = dict(nodes=8, topology="rrg:3", rounds=5, seed=0, local_steps=10, self_weight=0.5)
    vc = simulate(SimulationConfig(merge="vc", **setup))
    avg = simulate(SimulationConfig(merge="avg", **setup))
    assert vc.final_accuracy > avg.final_accuracy + 0.05
    # plain averaging collapses the weight variance after the first merge; VC keeps it
    first_conv = "features.0.weight"
    initial = vc.history[0]["variance"][first_conv]
    assert avg.history[1]["variance"][first_conv] < 0.6 * initial
    assert vc.history[1]["variance"][first_conv] > 0.8 * initial


def test_drops_churn_delay_and_codecs_count_bytes():
    base = simulate(SimulationConfig(**SMALL))
    half = simulate(SimulationConfig(**SMALL, codec="fp16"))
    assert 0.45 < half.history[-1]["bytes_sent"] / base.history[-1]["bytes_sent"] < 0.55
    lossy = simulate(SimulationConfig(**SMALL, drop=0.5, churn=0.3, delay=1, peers=1, trigger=1))
    assert all(0.0 <= r["mean_accuracy"] <= 1.0 for r in lossy.history)
    assert lossy.history[-1]["bytes_sent"] < base.history[-1]["bytes_sent"]


def test_cli_compare_json(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--nodes",
            "4",
            "--topology",
            "ring",
            "--rounds",
            "2",
            "--local-steps",
            "2",
            "--compare",
            "--json",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    doc = json.loads(result.stdout)
    assert set(doc["methods"]) == {"vc", "avg", "fedavg"}
    assert doc["target_accuracy"] == pytest.approx(0.9 * doc["methods"]["fedavg"]["final_accuracy"])
    for row in doc["methods"].values():
        assert 0.0 <= row["final_accuracy"] <= 1.0
        assert row["rounds_to_target"] is None or 1 <= row["rounds_to_target"] <= 2
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "vc.json").is_file()


def test_cli_bad_topology_or_data_fails_before_any_work():
    result = CliRunner().invoke(app, ["simulate", "--topology", "hypercube", "--rounds", "1"])
    assert result.exit_code == 1 and "hypercube" in result.output
    assert result.output.strip().splitlines() == [
        "error: unknown topology 'hypercube'; valid forms: rrg:<d>, ring, full, star, "
        "scale-free:<m>, ba:<m>"
    ]  # one line: no progress bar drawn before the error
    result = CliRunner().invoke(app, ["simulate", "--data", "weird", "--rounds", "1"])
    assert result.exit_code == 1 and "bad partition 'weird'" in result.output
    with pytest.raises(ValueError, match="needs degree d < num_nodes"):
        SimulationConfig(nodes=5, topology="rrg:9")


def test_binary_network_gossips_with_sign_codec():
    config = SimulationConfig(
        nodes=3,
        topology="full",
        rounds=1,
        local_steps=1,
        batch_size=8,
        model="bireal18",
        model_args={"width": 0.125, "stem": "imagenet"},
        codec="sign",
    )
    result = simulate(config)
    fp32 = simulate(SimulationConfig(**{**config.__dict__, "codec": "fp32"}))
    # latent weights of binary layers travel as 1 bit + scale
    assert result.history[-1]["bytes_sent"] < 0.2 * fp32.history[-1]["bytes_sent"]
    assert 0.0 <= result.final_accuracy <= 1.0
    # --no-rescale-binary: latent weights are averaged only, so their variance shrinks
    kept = simulate(
        SimulationConfig(**{**config.__dict__, "codec": "fp32", "rescale_binary": False})
    )
    name = "stages.0.0.conv.weight"  # a binary conv (is_binary)
    assert kept.history[-1]["variance"][name] < 0.8 * fp32.history[-1]["variance"][name]
