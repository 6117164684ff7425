"""The NASB search: mixed op, DARTS derivation, the OPs cost model and penalty, runs and resume."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from fleet_cli_support import fails_with_one_line
from safetensors.torch import load_file
from typer.testing import CliRunner

import exporters
import models
from models.nasb import PRIMITIVES, Genotype
from models.training import make_optimizer, train_steps
from toolkit.cli import app
from toolkit.cli.search_cmd import parse_ops
from toolkit.data import load_dataset
from toolkit.search import (
    MixedOp,
    SearchConfig,
    Supernet,
    cost_table,
    derive_genotype,
    expected_ops,
    ops_penalty,
    search,
)
from toolkit.search.cost import check_target, derived_network

# tiny: 4 channels; 3 cells so both a normal and a reduction cell train
TINY = {"channels": 4, "layers": 3, "in_channels": 1, "stem": "imagenet"}
TINY_SEARCH = {
    "dataset": "digits",
    "epochs": 1,
    "cells": 3,
    "channels": 4,
    "limit": 256,
    "batch_size": 64,
    "seed": 0,
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


def tiny_supernet(seed: int = 0, **overrides) -> Supernet:
    torch.manual_seed(seed)
    return Supernet(**(TINY | overrides))


# ------------------------------------------------------------------------------ mixed op


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("chosen", range(len(PRIMITIVES)))
def test_mixed_op_equals_the_chosen_op_when_its_weight_dominates(chosen, stride):
    torch.manual_seed(0)
    mixed = MixedOp(4, stride).eval()
    x = torch.randn(2, 4, 8, 8)
    alpha = torch.zeros(len(PRIMITIVES))
    alpha[chosen] = 40.0  # the others weigh e^-40
    out = mixed(x, torch.softmax(alpha, dim=0))
    assert torch.allclose(out, mixed.ops[chosen](x), atol=1e-6)
    # and a different op's output is not what comes out (the weights are used)
    other = (chosen + 4) % len(PRIMITIVES)
    if PRIMITIVES[other] != "none" or PRIMITIVES[chosen] != "none":
        assert not torch.allclose(out, mixed.ops[other](x), atol=1e-3)


def test_mixed_op_refuses_weights_of_the_wrong_length():
    with pytest.raises(ValueError, match="8 candidates needs 8 weights"):
        MixedOp(4, 1)(torch.zeros(1, 4, 4, 4), torch.ones(3))


# ------------------------------------------------------------------------------ derivation


def _alphas(rows: dict[int, dict[str, float]], edges: int) -> torch.Tensor:
    alphas = torch.zeros(edges, len(PRIMITIVES))
    for row, values in rows.items():
        for name, value in values.items():
            alphas[row, PRIMITIVES.index(name)] = value
    return alphas


def test_derive_genotype_follows_the_darts_rule_on_hand_set_alphas():
    # 2 nodes: rows 0,1 -> node 0 (inputs 0,1); rows 2,3,4 -> node 1 (inputs 0,1,2)
    normal = _alphas(
        {
            0: {"bin_conv_3x3": 2.0, "max_pool_3x3": 1.0},
            1: {"none": 9.0, "skip_connect": 1.0},  # none never chosen: skip is the op kept
            2: {"none": 9.0, "bin_conv_5x5": 3.0},  # strong "none": a weak edge by DARTS's score
            3: {"avg_pool_3x3": 2.0},
            4: {"bin_dil_conv_3x3": 2.5},
        },
        5,
    )
    reduce = _alphas(
        {
            0: {"bin_dil_conv_5x5": 1.0},
            1: {"max_pool_3x3": 3.0},
            2: {"skip_connect": 4.0},
            3: {},  # all equal: ties go to the first non-none op, max_pool_3x3
            4: {"bin_conv_3x3": 4.0},  # ties with row 2: the lower input wins first place
        },
        5,
    )
    genotype = derive_genotype(normal, reduce, nodes=2)
    assert genotype.normal == (
        ("bin_conv_3x3", 0),
        ("skip_connect", 1),
        ("bin_dil_conv_3x3", 2),
        ("avg_pool_3x3", 1),
    )
    assert genotype.reduce == (
        ("max_pool_3x3", 1),
        ("bin_dil_conv_5x5", 0),
        ("skip_connect", 0),
        ("bin_conv_3x3", 2),
    )
    assert genotype.normal_concat == genotype.reduce_concat == (2, 3)
    assert Genotype.from_dict(genotype.to_dict()) == genotype


def test_derive_genotype_names_a_wrong_alpha_shape():
    with pytest.raises(ValueError, match=r"alphas_normal must be 14 edges x 8 candidates"):
        derive_genotype(torch.zeros(5, 8), torch.zeros(14, 8), nodes=4)


# ------------------------------------------------------------------------------ cost


def _decisive(supernet: Supernet, genotype: Genotype, scale: float = 60.0) -> None:
    """Set the alphas so that DARTS's rule derives ``genotype`` and every weight is ~0 or ~1."""
    rows = {pair: row for row, pair in enumerate((i, j) for i in range(4) for j in range(2 + i))}
    names = supernet.primitives
    with torch.no_grad():
        for alphas, genes in (
            (supernet.alphas_normal, genotype.normal),
            (supernet.alphas_reduce, genotype.reduce),
        ):
            alphas.zero_()
            alphas[:, names.index("none")] = scale  # edges left out: "none" takes all weight
            for index, (op, source) in enumerate(genes):
                row = rows[(index // 2, source)]
                # a node's second edge a little weaker ("none" keeps some of its weight), so
                # the rule lists the two in the genotype's order
                alphas[row, names.index("none")] = 0.0 if index % 2 == 0 else scale - 2.0
                alphas[row, names.index(op)] = scale


def test_expected_ops_is_the_counted_cost_of_the_derived_network_when_alphas_are_decisive():
    supernet = tiny_supernet()
    table = cost_table(supernet, input_size=64)
    torch.manual_seed(1)
    for _ in range(3):
        supernet.alphas_normal.data.normal_()
        supernet.alphas_reduce.data.normal_()
        genotype = supernet.derive_genotype()
        counted = models.count_ops(derived_network(supernet, genotype), (1, 1, 64, 64)).ops
        assert table.of_genotype(genotype) == pytest.approx(counted, rel=1e-9)
        _decisive(supernet, genotype)
        assert supernet.derive_genotype() == genotype
        expected = float(expected_ops(supernet, 64, table).detach())
        assert expected == pytest.approx(counted, rel=1e-6)


def test_bounds_are_the_cheapest_and_dearest_derivable_networks():
    supernet = tiny_supernet()
    table = cost_table(supernet, input_size=64)
    low, high = table.bounds()
    cheapest, dearest = table.extreme_genotypes()
    for genotype, bound in ((cheapest, low), (dearest, high)):
        net = derived_network(supernet, genotype)
        assert models.count_ops(net, (1, 1, 64, 64)).ops == pytest.approx(bound, rel=1e-9)
    assert low < high
    # every op is free or costs something: a pool-only cell is the cheapest here
    assert {op for op, _ in cheapest.normal} <= {"max_pool_3x3", "avg_pool_3x3", "skip_connect"}


@pytest.mark.parametrize("where", [0.1, 0.9])
def test_the_ops_penalty_moves_the_derived_cost_toward_the_target(where):
    supernet = tiny_supernet(seed=3)
    table = cost_table(supernet, input_size=64)
    low, high = table.bounds()
    target = low + where * (high - low)
    # start leaning the other way: toward the dearest network for a low target and vice versa
    cheapest, dearest = table.extreme_genotypes()
    _decisive(supernet, dearest if where < 0.5 else cheapest, scale=1.0)

    def costs() -> tuple[float, float]:
        with torch.no_grad():
            expected = float(table.expected(supernet.alphas_normal, supernet.alphas_reduce))
        return table.of_genotype(supernet.derive_genotype()), expected

    start, start_expected = costs()
    optimizer = torch.optim.Adam(supernet.arch_parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        penalty = ops_penalty(
            table.expected(supernet.alphas_normal, supernet.alphas_reduce),
            target,
            1.0,
            table.log_reach,
        )
        penalty.backward()
        optimizer.step()
    end, end_expected = costs()
    assert abs(math.log(end / target)) < 0.5 * abs(math.log(start / target))
    assert abs(math.log(end_expected / target)) < 0.1 * abs(math.log(start_expected / target))


def test_a_target_copied_from_the_out_of_reach_message_is_accepted():
    table = cost_table(tiny_supernet(), input_size=64)
    low, high = table.bounds()
    with pytest.raises(ValueError, match="out of reach") as caught:
        check_target(table, 0.5 * low)
    copied = re.search(r"cost (\S+) to (\S+) OPs", str(caught.value))
    assert copied is not None
    for bound in copied.groups():
        check_target(table, float(bound))  # rounded outward: inside what is accepted
    with pytest.raises(ValueError, match="out of reach"):
        check_target(table, 1.01 * high)


def test_the_penalty_is_symmetric_in_ratio_and_zero_at_the_target():
    target = 1e8
    assert float(ops_penalty(torch.tensor(target), target, 2.0)) == 0.0
    double = float(ops_penalty(torch.tensor(2 * target), target, 2.0))
    half = float(ops_penalty(torch.tensor(0.5 * target), target, 2.0))
    assert double == pytest.approx(half) == pytest.approx(2.0 * math.log(2) ** 2)
    # measured in the space's reach: the far end of a range of x2 pays lam
    assert float(ops_penalty(torch.tensor(target), 2 * target, 3.0, math.log(2))) == 3.0


# ------------------------------------------------------------------------------ runs


def _alphas_of(checkpoint_dir) -> dict[str, torch.Tensor]:
    state = load_file(str(checkpoint_dir / "model.safetensors"))
    return {k: state[k] for k in ("alphas_normal", "alphas_reduce")}


def _tiny_config(digits, **overrides) -> SearchConfig:
    table = cost_table(
        Supernet(channels=4, layers=3, in_channels=1, num_classes=10, stem="imagenet"), 224
    )
    low, high = table.bounds()
    return SearchConfig(**(TINY_SEARCH | {"target_ops": (low + high) / 2} | overrides))


def test_a_tiny_search_writes_a_genotype_that_builds_trains_and_exports(tmp_path, digits):
    out = tmp_path / "search"
    result = search(_tiny_config(digits), out, progress=False, train_data=digits)
    genotype = Genotype.load(out / "genotype.json")
    assert genotype == result.genotype
    assert (out / "alphas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "search.json").read_text())
    assert saved["genotype"] == genotype.to_dict() and len(saved["history"]) == 1
    record = saved["history"][0]
    assert record["epoch"] == 1 and 0.0 <= record["val_accuracy"] <= 1.0
    assert math.isfinite(record["train_loss"]) and record["penalty"] >= 0.0

    net = models.create("nasb", genotype=str(out / "genotype.json"), **result.network)
    assert models.count_ops(net, (1, 1, 224, 224)).ops == pytest.approx(result.ops)
    low, high = result.bounds
    assert low <= result.ops <= high
    optimizer = make_optimizer(net, "adam", 1e-3)
    batch = (torch.from_numpy(digits.x[:16]), torch.from_numpy(digits.y[:16]))
    stats = train_steps(net, optimizer, iter([batch]))
    assert stats["samples"] == 16 and math.isfinite(stats["loss"])
    artifact = exporters.export(
        net.eval(), tmp_path / "artifact", "onnx-portable", input_shape=(1, 32, 32)
    )
    assert (artifact / "model.onnx").is_file()


def test_resume_continues_to_the_same_alphas_as_a_run_that_never_stopped(tmp_path, digits):
    config = _tiny_config(digits, epochs=2, limit=128)
    straight = tmp_path / "straight"
    search(config, straight, progress=False, train_data=digits)
    # the same run, stopped after epoch 1: only its first checkpoint exists
    stopped = tmp_path / "stopped"
    shutil.copytree(straight / "checkpoints" / "epoch_0001", stopped / "checkpoints" / "epoch_0001")
    resumed = search(config, stopped, resume=True, progress=False, train_data=digits)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    final = _alphas_of(stopped / "checkpoints" / "epoch_0002")
    reference = _alphas_of(straight / "checkpoints" / "epoch_0002")
    for name, tensor in reference.items():
        assert torch.equal(final[name], tensor), name
    assert not torch.equal(
        final["alphas_normal"], _alphas_of(stopped / "checkpoints" / "epoch_0001")["alphas_normal"]
    )
    assert resumed.genotype == Genotype.load(straight / "genotype.json")


def test_warmup_epochs_train_the_weights_with_the_alphas_frozen(tmp_path, digits):
    out = tmp_path / "warm"
    result = search(
        _tiny_config(digits, epochs=2, warmup_epochs=1, limit=128),
        out,
        progress=False,
        train_data=digits,
    )
    first, second = result.history
    assert first["warmup"] and not second["warmup"]
    assert first["val_accuracy"] is None and first["penalty"] is None  # no alpha step taken
    assert math.isfinite(first["train_loss"]) and 0.0 <= second["val_accuracy"] <= 1.0
    torch.manual_seed(0)  # the search's own seeding of the supernet's initialisation
    start = Supernet(channels=4, layers=3, in_channels=1, num_classes=10, stem="imagenet")
    after_warmup = _alphas_of(out / "checkpoints" / "epoch_0001")
    assert torch.equal(after_warmup["alphas_normal"], start.alphas_normal.detach())
    after = _alphas_of(out / "checkpoints" / "epoch_0002")
    assert not torch.equal(after["alphas_normal"], after_warmup["alphas_normal"])
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0 and below epochs"):
        _tiny_config(digits, epochs=2, warmup_epochs=2)


def test_resume_refuses_other_settings_and_a_fresh_run_refuses_a_used_folder(tmp_path, digits):
    out = tmp_path / "s"
    config = _tiny_config(digits, limit=64)
    search(config, out, progress=False, train_data=digits)
    with pytest.raises(ValueError, match="lam=1.0, this one lam=2.0"):
        search(_tiny_config(digits, limit=64, lam=2.0), out, resume=True, train_data=digits)
    with pytest.raises(FileExistsError, match="--resume"):
        search(config, out, progress=False, train_data=digits)
    with pytest.raises(FileNotFoundError, match="no search checkpoint"):
        search(config, tmp_path / "empty", resume=True, train_data=digits)


# ------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def test_cli_search_json_reports_genotype_ops_and_target(runner, tmp_path):
    out = tmp_path / "s"
    args = ["search", "--dataset", "digits", "--epochs", "1", "--cells", "2", "--channels", "4"]
    args += ["--limit", "128", "--target-ops", "6.2M", "--out", str(out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["target_ops"] == 6.2e6
    assert Genotype.from_dict(document["genotype"]) == Genotype.load(out / "genotype.json")
    net = models.create("nasb", genotype=document["genotype"], **document["network"])
    assert document["ops"] == pytest.approx(models.count_ops(net, (1, 1, 224, 224)).ops)


def test_cli_search_says_where_the_genotype_is_and_how_to_train_it(runner, tmp_path):
    out = tmp_path / "s"
    args = ["search", "--dataset", "digits", "--epochs", "1", "--channels", "10"]
    args += ["--limit", "64", "--target-ops", "40M", "--out", str(out), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"genotype written to {out / 'genotype.json'}")
    assert "target 40.00M" in lines[0]
    # 8 cells of 10 channels: the default network at width 0.5
    assert lines[1] == (
        f"train it: bitfleet train --model nasb --genotype {out / 'genotype.json'} "
        "--dataset digits --stem imagenet --width 0.5"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--space", "darts"], "unknown search space 'darts'; known spaces: nasb"),
        (["--target-ops", "1e3"], "out of reach"),
        (["--target-ops", "1e12"], "out of reach"),
        (["--target-ops", "lots"], "--target-ops must be a positive number"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--dataset", "cifar10"], "needs its files"),
        (["--ops", "none,conv_9x9"], "unknown operation 'conv_9x9'"),
    ],
)
def test_cli_bad_input_is_one_line_before_any_training(runner, tmp_path, args, expected):
    out = tmp_path / "s"
    base = ["search", "--dataset", "digits", "--cells", "2", "--channels", "4"]
    base += ["--target-ops", "6.2e6", "--out", str(out), "--epochs", "1"]
    result = runner.invoke(app, base + args)
    fails_with_one_line(result, expected)
    assert not out.exists()


def test_parse_ops_takes_exponents_and_suffixes():
    assert parse_ops("1.6e8") == 1.6e8
    assert parse_ops("160M") == 160e6
    assert parse_ops("0.16g") == pytest.approx(1.6e8)
    with pytest.raises(ValueError, match="--target-ops"):
        parse_ops("-3")
