"""The batched simulator engine agrees with the loop's primitives and the loop simulator.

Tolerance: parameters within atol 1e-5 (float32 training; the engines differ only in the
order of float operations, measured differences are ~3e-8 after a few rounds).
"""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_agent.merge import Merger, weighted_average
from models.training import BatchSampler, make_optimizer, state_to_numpy, train_steps
from toolkit.data import load_dataset
from toolkit.sim_batched import (
    NeighbourTable,
    StackedModels,
    _MaxPool2x2,
    check_supported,
    fedavg_average,
    gossip_merge,
    simulate_batched,
)
from toolkit.simulate import SimulationConfig, preset, simulate
from toolkit.train import make_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


def _fleet(train, nodes, momentum=0.9, nesterov=True, weight_decay=5e-4, batch=32):
    models, optimizers, streams = [], [], []
    for node in range(nodes):
        torch.manual_seed(100 + node)
        model = make_model("lenet5", train)
        models.append(model)
        optimizers.append(make_optimizer(model, "sgd", 0.05, momentum, weight_decay, nesterov))
        sampler = BatchSampler(train.x, train.y, batch)
        streams.append(sampler.endless(np.random.default_rng(node)))
    return models, optimizers, streams


def _assert_close(stacked, models):
    for node, model in enumerate(models):
        for name, value in model.state_dict().items():
            torch.testing.assert_close(stacked[name][node], value, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "momentum, nesterov, weight_decay", [(0.9, True, 5e-4), (0.9, False, 5e-4), (0.0, False, 0.0)]
)
def test_training_matches_train_steps(digits, momentum, nesterov, weight_decay):
    models, optimizers, streams = _fleet(digits, 6, momentum, nesterov, weight_decay)
    # the batched fleet starts from the same weights and draws the same batches
    _, _, batched_streams = _fleet(digits, 6, momentum, nesterov, weight_decay)
    stacked = StackedModels.from_modules(models, optimizers, (1, 32, 32), chunk=4)
    for model, optimizer, stream in zip(models, optimizers, streams, strict=True):
        train_steps(model, optimizer, itertools.islice(stream, 3))
    stacked.train(batched_streams, 3)
    _assert_close(stacked.state(), models)
    # and the momentum buffers carry on identically
    for model, optimizer, stream in zip(models, optimizers, streams, strict=True):
        train_steps(model, optimizer, itertools.islice(stream, 2))
    stacked.train(batched_streams, 2)
    _assert_close(stacked.state(), models)


def test_batches_of_different_sizes_train_in_groups(digits):
    models, optimizers, _ = _fleet(digits, 3)
    stacked = StackedModels.from_modules(models, optimizers, (1, 32, 32))
    x, y = torch.as_tensor(digits.x), torch.as_tensor(digits.y)
    batches = [(x[:16], y[:16]), (x[16:24], y[16:24]), (x[24:40], y[24:40])]
    stacked.train_step(batches)
    for model, optimizer, batch in zip(models, optimizers, batches, strict=True):
        train_steps(model, optimizer, iter([batch]))
    _assert_close(stacked.state(), models)


def test_accuracies_match_evaluate(digits):
    from models.training import evaluate

    models, optimizers, _ = _fleet(digits, 3)
    stacked = StackedModels.from_modules(models, optimizers, (1, 32, 32))
    test = load_dataset("digits", "test")
    got = stacked.accuracies(torch.as_tensor(test.x), torch.as_tensor(test.y), batch_size=100)
    want = [evaluate(m, test.x, test.y)["accuracy"] for m in models]
    np.testing.assert_allclose(got, want, atol=1 / len(test.y))


def test_fast_pool_is_max_pool2d_exactly():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(3, 4, 9, 10))  # odd height: the last row is dropped
    x[:, :, :4, :4] = 0.5  # ties: the first maximum in scan order takes the gradient
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = F.max_pool2d(a, 2)
    got = _MaxPool2x2.apply(b)[0]
    assert torch.equal(got, want)
    weights = torch.randn(want.shape)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    assert torch.equal(a.grad, b.grad)


def _random_states(nodes, seed):
    rng = np.random.default_rng(seed)
    return [
        {
            "w": rng.normal(0, 1 + node, (4, 3)).astype(np.float32),
            "bias": rng.normal(0, 0.5, 5).astype(np.float32),
            "one": rng.normal(size=1).astype(np.float32),  # one element: never rescaled
            "bn.running_mean": rng.normal(size=3).astype(np.float32),  # kept from the own model
            "bn.num_batches_tracked": np.array(node * 3, dtype=np.int64),
        }
        for node in range(nodes)
    ]


# an irregular graph: degrees 1 to 4, and senders 10 < 2 < 3 in the Merger's string order
IRREGULAR = [[1, 2, 10], [0], [0, 3], [2, 4, 5], [3], [3, 6], [5], [8], [7, 9], [8, 10], [0, 9]]


@pytest.mark.parametrize("method", ["avg", "vc"])
@pytest.mark.parametrize("variance", ["others", "self", "conservative"])
@pytest.mark.parametrize("rule", ["bitfleet", "dfl2"])
def test_gossip_merge_matches_merger(method, variance, rule):
    states = _random_states(len(IRREGULAR), seed=1)
    stacked = {n: torch.from_numpy(np.stack([s[n] for s in states])) for n in states[0]}
    merged = gossip_merge(
        stacked, NeighbourTable.from_lists(IRREGULAR), method, 0.3, variance, rule=rule
    )
    for node, peers in enumerate(IRREGULAR):
        merger = Merger(
            method=method,
            self_weight=0.3,
            variance=variance,
            trigger="all",
            neighbours=[str(p) for p in peers],
            rule=rule,
        )
        for peer in peers:
            merger.add(str(peer), states[peer])
        want = merger.merge_into(states[node])
        assert want is not None
        for name, value in want.items():
            got = merged[name][node].numpy()
            assert got.dtype == value.dtype
            np.testing.assert_allclose(got, value, atol=1e-6, rtol=0, err_msg=f"{node} {name}")


def test_gossip_merge_leaves_no_rescale_names_averaged():
    states = _random_states(len(IRREGULAR), seed=2)
    stacked = {n: torch.from_numpy(np.stack([s[n] for s in states])) for n in states[0]}
    table = NeighbourTable.from_lists(IRREGULAR)
    exempt = gossip_merge(stacked, table, "vc", 0.3, no_rescale=["w"])
    plain = gossip_merge(stacked, table, "avg", 0.3)
    vc = gossip_merge(stacked, table, "vc", 0.3)
    torch.testing.assert_close(exempt["w"], plain["w"])
    assert not torch.allclose(vc["w"], plain["w"])


@pytest.mark.parametrize("weights", [None, [3.0, 1.0, 2.0, 5.0]])
def test_fedavg_average_matches_weighted_average(weights):
    states = _random_states(4, seed=3)
    stacked = {n: torch.from_numpy(np.stack([s[n] for s in states])) for n in states[0]}
    got = fedavg_average(stacked, weights)
    want = weighted_average(states, weights)
    for name, value in want.items():
        assert got[name].numpy().dtype == value.dtype
        np.testing.assert_allclose(got[name].numpy(), value, atol=1e-6, rtol=0)


def test_neighbour_table_pads_with_zero_weight():
    table = NeighbourTable.from_lists([[1, 2], [0], [0]])
    assert table.index.tolist() == [[1, 2], [0, 1], [0, 2]]
    assert table.weight.tolist() == [[0.5, 0.5], [1.0, 0.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match="at least one neighbour"):
        NeighbourTable.from_lists([[1], []])


SMALL = dict(nodes=6, topology="rrg:3", rounds=3, seed=2, eval_every=2)


@pytest.mark.parametrize(
    "settings",
    [
        dict(merge="vc"),
        dict(merge="avg"),
        dict(merge="fedavg"),
        dict(merge="vc", vc_rule="dfl2", topology="ring"),
    ],
    ids=["vc", "avg", "fedavg", "vc-dfl2-ring"],
)
def test_simulate_batched_matches_the_loop(settings):
    # the paper preset: one step of batch 64 from dirichlet pools, augmentation, classic
    # momentum with weight decay, Xavier init, equal FedAvg weights, balanced test subset
    config = {**SMALL, **settings}
    loop = simulate(preset("paper", **config))
    batched = simulate_batched(preset("paper", **config))
    assert [r["round"] for r in batched.history] == [r["round"] for r in loop.history]
    for a, b in zip(loop.history, batched.history, strict=True):
        assert a.keys() == b.keys()
        assert a["bytes_sent"] == b["bytes_sent"] and a["steps"] == b["steps"]
        for key in ("mean_accuracy", "min_accuracy", "max_accuracy"):
            assert b[key] == pytest.approx(a[key], abs=1e-9)
        for name, value in a["variance"].items():
            assert b["variance"][name] == pytest.approx(value, rel=1e-5, abs=1e-12)
    assert loop.final_states is not None and batched.final_states is not None
    for want, got in zip(loop.final_states, batched.final_states, strict=True):
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=ATOL, rtol=0, err_msg=name)


def test_simulate_batched_default_regime_matches_the_loop():
    # the agents' regime: shards, several Nesterov steps per round, sample-weighted FedAvg
    for merge in ("vc", "fedavg"):
        config = SimulationConfig(
            nodes=4, topology="ring", rounds=2, local_steps=2, batch_size=16, momentum=0.5,
            merge=merge, seed=4,
        )  # fmt: skip
        loop, batched = simulate(config), simulate_batched(config)
        assert loop.final_states is not None and batched.final_states is not None
        for want, got in zip(loop.final_states, batched.final_states, strict=True):
            for name, value in want.items():
                np.testing.assert_allclose(got[name], value, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(drop=0.1), "drop=0.1"),
        (dict(churn=0.2), "churn=0.2"),
        (dict(delay=1), "delay=1"),
        (dict(codec="int8"), "codec='int8'"),
        (dict(optimizer="adam"), "optimizer='adam'"),
        (dict(trigger=2), "trigger=2"),
        (dict(peers=2), "peers=2"),
    ],
)
def test_refuses_what_it_cannot_run(settings, named):
    config = SimulationConfig(nodes=6, topology="rrg:3", **settings)
    with pytest.raises(ValueError, match="--engine loop") as err:
        check_supported(config)
    assert named in str(err.value)


def test_refuses_models_it_cannot_run(digits):
    bn = [make_model("resnet18", digits, width=0.125) for _ in range(2)]
    with pytest.raises(ValueError, match="batch-norm running statistics.*--engine loop"):
        StackedModels.from_modules(bn, [make_optimizer(m, "sgd") for m in bn], (1, 32, 32))
    dropout = [nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(1024, 10)) for _ in range(2)]
    with pytest.raises(ValueError, match="cannot run this model.*--engine loop"):
        StackedModels.from_modules(
            dropout, [make_optimizer(m, "sgd") for m in dropout], (1, 32, 32)
        )
    lenet = [make_model("lenet5", digits) for _ in range(2)]
    with pytest.raises(ValueError, match="SGD only.*--engine loop"):
        StackedModels.from_modules(lenet, [make_optimizer(m, "adam") for m in lenet], (1, 32, 32))


def test_node_states_are_the_loop_format(digits):
    models, optimizers, _ = _fleet(digits, 2)
    stacked = StackedModels.from_modules(models, optimizers, (1, 32, 32))
    states = stacked.node_states()
    want = state_to_numpy(models[1])
    assert list(states[1]) == list(want)
    for name, value in want.items():
        np.testing.assert_array_equal(states[1][name], value)


def test_per_node_layer_outside_vmap_is_the_plain_layer():
    from toolkit.sim_batched import _PerNode

    torch.manual_seed(1)
    for fn, shapes, conf in (
        (F.linear, ((5, 7), (3, 7), (3,)), ()),
        (F.conv2d, ((2, 3, 8, 8), (4, 3, 3, 3), (4,)), ((1, 1), (1, 1), (1, 1), 1)),
    ):
        inputs = [torch.randn(s, requires_grad=True) for s in shapes]
        copies = [t.detach().clone().requires_grad_() for t in inputs]
        want = fn(*inputs, *conf)
        got = _PerNode.apply(fn, *copies, conf)
        torch.testing.assert_close(got, want)
        weights = torch.randn(want.shape)
        (want * weights).sum().backward()
        (got * weights).sum().backward()
        for a, b in zip(inputs, copies, strict=True):
            torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize(
    "settings",
    [
        dict(data="dirichlet-pool:0.5", batch_size=64, augment=True),  # one size: stacked
        dict(data="dirichlet:0.1", batch_size=250, augment=True),  # shards of 210..342: per node
        dict(data="iid", batch_size=32, augment=False),
    ],
)
def test_node_batches_are_the_loop_streams(digits, settings):
    from toolkit.sim_batched import NodeBatches
    from toolkit.simulate import _Fleet, parse_partition

    config = SimulationConfig(nodes=5, topology="ring", seed=3, **settings)
    spec = parse_partition(config.data)
    if spec.pooled:
        shards, probs = None, spec.label_probs(digits.y, config.nodes, seed=config.seed)
    else:
        shards, probs = spec.apply(digits.y, config.nodes, seed=config.seed), None
    streams = _Fleet(config, digits, shards, probs).streams
    batches = NodeBatches(config, digits, shards, probs)
    for _ in range(3):
        got = batches.next()
        pairs = got if isinstance(got, list) else list(zip(*got.take(0, 5), strict=True))
        assert isinstance(got, list) == (config.batch_size == 250)
        for (x, y), stream in zip(pairs, streams, strict=True):
            want_x, want_y = next(stream)
            assert torch.equal(y, want_y)
            torch.testing.assert_close(x, want_x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("merge", ["vc", "fedavg"])
def test_worker_processes_give_the_same_run(merge):
    # two spawned workers train and evaluate halves of the fleet on shared tensors
    config = dict(nodes=5, topology="ring", rounds=2, seed=6, merge=merge)
    one = simulate_batched(preset("paper", **config))
    two = simulate_batched(preset("paper", **config), workers=2)
    assert [r["mean_accuracy"] for r in two.history] == [r["mean_accuracy"] for r in one.history]
    assert one.final_states is not None and two.final_states is not None
    for want, got in zip(one.final_states, two.final_states, strict=True):
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=ATOL, rtol=0)


def test_a_failing_worker_is_reported():
    from toolkit import sim_batched

    config = preset("paper", nodes=4, topology="ring", rounds=1, seed=1)
    run = sim_batched.BatchedSimulation(config, workers=2)
    try:
        run.pool.processes[1].kill()
        with pytest.raises(RuntimeError, match="worker process died"):
            run.train_round()
    finally:
        run.close()


def test_twin_pools_before_relu_with_the_same_gradients():
    from toolkit.sim_batched import _batched_twin, _FastMaxPool2d

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    twin = _batched_twin(model)
    assert isinstance(twin[1], _FastMaxPool2d) and isinstance(twin[2], nn.ReLU)
    x = torch.randn(5, 1, 12, 12)
    x[:, :, :6, :6] = 0.0  # constant patches: tied conv outputs, at the bias
    for p in twin.parameters():
        p.requires_grad_(True)
    want, got = model(x), twin(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    weights = torch.randn(want.shape)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-6)


def test_simulate_runs_the_batched_engine_when_asked():
    config = dict(nodes=5, topology="ring", rounds=2, seed=8, merge="vc")
    loop = simulate(preset("paper", **config))
    batched = simulate(preset("paper", engine="batched", **config))
    assert batched.config.engine == "batched"
    assert [r["mean_accuracy"] for r in batched.history] == [
        r["mean_accuracy"] for r in loop.history
    ]
    assert loop.final_states is not None and batched.final_states is not None
    for want, got in zip(loop.final_states, batched.final_states, strict=True):
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=ATOL, rtol=0)


def test_engine_is_checked_with_the_config():
    with pytest.raises(ValueError, match="unknown engine 'gpu'; use one of loop, batched"):
        SimulationConfig(engine="gpu")
    with pytest.raises(ValueError, match="drop=0.1.*--engine loop"):
        SimulationConfig(engine="batched", drop=0.1)
    SimulationConfig(engine="loop", drop=0.1)  # the loop runs everything


def test_cli_engine_batched():
    from typer.testing import CliRunner

    from toolkit.cli import app

    args = ["simulate", "--nodes", "4", "--topology", "ring", "--rounds", "1", "--engine"]
    result = CliRunner().invoke(app, [*args, "batched", "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert '"vc"' in result.output
    result = CliRunner().invoke(app, [*args, "batched", "--drop", "0.1", "--rounds", "1"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the batched engine cannot run drop=0.1")
    assert "--engine loop" in lines[0]
