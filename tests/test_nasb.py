"""NASB: the candidate operations, the genotype format, and the network built from a genotype."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from models.nasb import (
    BINARY_PRIMITIVES,
    PRIMITIVES,
    FactorizedReduce,
    Genotype,
    GenotypeError,
    make_op,
    preprocess,
)

# a genotype that uses every operation, in both cells, at stride 1 and 2, with a node that
# only feeds another node (state 3 is not in normal_concat)
EVERY_OP = {
    "normal": [
        ["bin_conv_3x3", 0],
        ["bin_conv_5x5", 1],
        ["bin_dil_conv_3x3", 0],
        ["bin_dil_conv_5x5", 2],
        ["skip_connect", 3],
        ["max_pool_3x3", 1],
        ["avg_pool_3x3", 4],
        ["none", 2],
    ],
    "normal_concat": [2, 4, 5],
    "reduce": [
        ["max_pool_3x3", 0],
        ["avg_pool_3x3", 1],
        ["skip_connect", 0],
        ["bin_conv_3x3", 1],
        ["bin_dil_conv_3x3", 1],
        ["bin_conv_5x5", 2],
        ["bin_dil_conv_5x5", 0],
        ["none", 3],
    ],
    "reduce_concat": [2, 3, 4, 5],
}


# --- the operations ------------------------------------------------------------------------


def test_primitives_are_the_contract():
    assert PRIMITIVES == (
        "none",
        "max_pool_3x3",
        "avg_pool_3x3",
        "skip_connect",
        "bin_conv_3x3",
        "bin_conv_5x5",
        "bin_dil_conv_3x3",
        "bin_dil_conv_5x5",
    )


@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_every_op_keeps_channels_and_divides_size_by_stride(name, stride, size):
    torch.manual_seed(0)
    op = make_op(name, 6, stride)
    x = torch.randn(2, 6, size, size, requires_grad=True)
    y = op(x)
    expected = -(-size // stride)  # ceil: what every stride-2 op of a cell gives
    assert y.shape == (2, 6, expected, expected)
    y.square().sum().backward()
    if name != "none":
        assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("stride", [1, 2])
def test_none_is_zero_and_has_no_parameters(stride):
    op = make_op("none", 4, stride)
    y = op(torch.randn(3, 4, 6, 6))
    assert torch.equal(y, torch.zeros(3, 4, 6 // stride, 6 // stride))
    assert not list(op.parameters())


@pytest.mark.parametrize("name", BINARY_PRIMITIVES)
def test_binary_ops_are_bireal_units(name):
    op = make_op(name, 4, 1)
    convs = [m for m in op.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].is_binary
    kernel, dilation = {
        "bin_conv_3x3": (3, 1),
        "bin_conv_5x5": (5, 1),
        "bin_dil_conv_3x3": (3, 2),
        "bin_dil_conv_5x5": (5, 2),
    }[name]
    assert convs[0].kernel_size == (kernel, kernel)
    assert convs[0].dilation == (dilation, dilation)
    # the real-valued shortcut: with the conv's batch norm scaled to 0, the op is the identity
    op.eval()
    nn.init.zeros_(op.bn.weight)
    x = torch.randn(1, 4, 5, 5)
    assert torch.allclose(op(x), x)
    # at stride 2 the shortcut is a 2x2 average pool
    down = make_op(name, 4, 2).eval()
    nn.init.zeros_(down.bn.weight)
    assert torch.allclose(down(x), nn.functional.avg_pool2d(x, 2, ceil_mode=True))


def test_skip_connect_is_identity_then_a_real_factorised_reduce():
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(make_op("skip_connect", 4, 1)(x), x)
    reduce = make_op("skip_connect", 4, 2)
    assert isinstance(reduce, FactorizedReduce)
    assert not any(getattr(m, "is_binary", False) for m in reduce.modules())


def test_pools_are_parameter_free_and_the_average_excludes_padding():
    ones = torch.ones(1, 2, 4, 4)
    assert torch.equal(make_op("avg_pool_3x3", 2, 1)(ones), ones)
    assert not list(make_op("max_pool_3x3", 2, 2).parameters())


def test_unknown_op_and_bad_stride():
    with pytest.raises(ValueError, match=r"unknown operation 'conv_9x9'; known operations: none"):
        make_op("conv_9x9", 4, 1)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        make_op("bin_conv_3x3", 4, 3)


@pytest.mark.parametrize("reduce", [False, True])
def test_preprocess_brings_an_input_to_the_cell(reduce):
    y = preprocess(12, 5, reduce=reduce)(torch.randn(2, 12, 7, 7))
    assert y.shape == (2, 5, 4, 4) if reduce else (2, 5, 7, 7)


# --- the genotype --------------------------------------------------------------------------


def test_genotype_round_trips_through_dict_and_file(tmp_path):
    genotype = Genotype.from_dict(EVERY_OP)
    assert genotype.nodes == 4
    assert genotype.to_dict() == EVERY_OP
    assert Genotype.from_dict(genotype.to_dict()) == genotype
    assert Genotype.load(EVERY_OP) == genotype
    path = genotype.save(tmp_path / "g.json")
    assert json.loads(path.read_text()) == EVERY_OP
    assert Genotype.load(path) == genotype
    assert Genotype.load(str(path)) == genotype
    # one edge a line: readable and diffable
    assert '    ["bin_conv_3x3", 0],\n' in path.read_text()


def test_concat_defaults_to_every_node():
    genotype = Genotype.from_dict({"normal": EVERY_OP["normal"], "reduce": EVERY_OP["reduce"]})
    assert genotype.normal_concat == genotype.reduce_concat == (2, 3, 4, 5)


def _with(cell: str, index: int, edge: list) -> dict:
    data = json.loads(json.dumps(EVERY_OP))
    data[cell][index] = edge
    return data


@pytest.mark.parametrize(
    "data, message",
    [
        (
            _with("normal", 3, ["conv_9x9", 1]),
            "genotype normal edge 3: unknown operation 'conv_9x9'; known operations: none, "
            "max_pool_3x3, avg_pool_3x3, skip_connect, bin_conv_3x3, bin_conv_5x5, "
            "bin_dil_conv_3x3, bin_dil_conv_5x5",
        ),
        (
            _with("reduce", 4, ["bin_conv_3x3", 4]),
            "genotype reduce edge 4 (node 2) takes input 4, but node 2 can only take 0..3 "
            "(0 and 1: the cell's inputs; 2 and up: earlier nodes)",
        ),
        (
            _with("normal", 0, ["bin_conv_3x3", -1]),
            "genotype normal edge 0 (node 0) takes input -1, but node 0 can only take 0..1",
        ),
        (
            {**EVERY_OP, "normal": EVERY_OP["normal"][:3]},
            "genotype normal has 3 edges; each node takes exactly two",
        ),
        ({**EVERY_OP, "normal_concat": [2, 6]}, "normal_concat names state 6, but the cell's"),
        ({**EVERY_OP, "reduce_concat": [3, 3]}, "reduce_concat names state 3 twice"),
        ({**EVERY_OP, "reduce_concat": []}, "reduce_concat is empty"),
        ({**EVERY_OP, "normal": EVERY_OP["normal"][:6]}, "normal has 3 nodes but reduce has 4"),
        ({**EVERY_OP, "extra": 1}, "unknown genotype key(s) extra"),
        ({"normal": EVERY_OP["normal"]}, "a genotype needs 'reduce'"),
        (_with("normal", 1, ["bin_conv_3x3"]), "normal edge 1: expected [operation, input]"),
        (_with("normal", 1, ["bin_conv_3x3", "1"]), "the input must be an integer"),
        ([1, 2], "a genotype is a dict or a path to a JSON file, not list"),
    ],
)
def test_bad_genotypes_are_one_clear_line(data, message):
    with pytest.raises(GenotypeError) as info:
        Genotype.load(data)
    assert str(info.value).startswith(message) or message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_genotype_files_name_the_file(tmp_path):
    with pytest.raises(GenotypeError, match="genotype file .*missing.json does not exist"):
        Genotype.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(GenotypeError, match="broken.json is not JSON"):
        Genotype.load(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(_with("normal", 2, ["bin_conv_7x7", 0])))
    with pytest.raises(GenotypeError, match=r"wrong.json: genotype normal edge 2: unknown op"):
        Genotype.load(wrong)


def test_genotype_is_frozen_and_hashable():
    genotype = Genotype.from_dict(EVERY_OP)
    with pytest.raises(AttributeError):
        genotype.normal = ()  # type: ignore[misc]
    assert len({genotype, Genotype.from_dict(EVERY_OP)}) == 1
