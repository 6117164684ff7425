"""The network a NASB genotype describes: its cells stacked DARTS-style, a real stem and head.

Layout (DARTS's, with Bi-Real's stems)::

    stem -> cell x layers -> global average pool -> linear

``layers`` cells in all; the ones at ``layers // 3`` and ``2 * layers // 3`` are reduction
cells (stride 2 on the edges that leave the cell's inputs, channels doubled), the others normal
cells. Each cell takes the outputs of the two cells before it (the stem's output stands in for
both at the start), brings each to the cell's channel count with :func:`~models.nasb.preprocess`
(a factorised reduce for the older one when the cell before was a reduction), computes its
nodes, and concatenates the nodes its genotype names. The stem is Bi-Real's (``"cifar"``: one
conv3x3 + BN; ``"imagenet"``: conv7x7/2 + BN + max-pool/2), with ``stem_multiplier x channels``
outputs.

Only what the genotype uses is built: a node that neither the output nor a later node reads,
or a cell input no edge reads, gets no layers, so every parameter of the network trains and
the op counter counts only work that is done.

:func:`analytic_cost` gives the network's FLOPs and BOPs from the genotype alone, by formula;
it equals :func:`models.count_ops` of the built network (a test holds them together), which is
what the search's OPs penalty relies on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..init import init_weights
from .genotype import Edge, Genotype
from .space import BINARY_PRIMITIVES, make_op, preprocess

__all__ = [
    "Cell",
    "NASBNetwork",
    "DEFAULT_CHANNELS",
    "DEFAULT_LAYERS",
    "DEFAULT_STEM_MULTIPLIER",
    "STEMS",
    "analytic_cost",
    "op_cost",
    "reduction_layers",
]

STEMS = ("cifar", "imagenet")

# With these, a typical genotype costs about Bi-Real-18's 164M OPs at 224x224 with the imagenet
# stem (docs/nasb.md has the table): cells are dominated by their real 1x1 preprocessing.
DEFAULT_CHANNELS = 20
DEFAULT_LAYERS = 8
DEFAULT_STEM_MULTIPLIER = 2

_KERNELS = {"bin_conv_3x3": 3, "bin_conv_5x5": 5, "bin_dil_conv_3x3": 3, "bin_dil_conv_5x5": 5}


def reduction_layers(layers: int) -> frozenset[int]:
    """Indices of the reduction cells among ``layers`` cells: 1/3 and 2/3 of the way."""
    return frozenset({layers // 3, 2 * layers // 3})


def _needed(edges: Sequence[Edge], concat: Sequence[int]) -> set[int]:
    """States (0, 1: inputs; 2..: nodes) that the cell's output depends on."""
    needed: set[int] = set()
    pending = list(concat)
    while pending:
        state = pending.pop()
        if state in needed:
            continue
        needed.add(state)
        if state >= 2:
            node = state - 2
            pending += [edges[2 * node][1], edges[2 * node + 1][1]]
    return needed


class Cell(nn.Module):
    """One normal or reduction cell of a genotype (see the module's doc)."""

    def __init__(
        self,
        edges: Sequence[Edge],
        concat: Sequence[int],
        c_prev_prev: int,
        c_prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.edges = tuple(edges)
        self.concat = tuple(concat)
        needed = _needed(self.edges, self.concat)
        self.preprocess0 = (
            preprocess(c_prev_prev, channels, reduce=reduction_prev) if 0 in needed else None
        )
        self.preprocess1 = preprocess(c_prev, channels) if 1 in needed else None
        # ModuleDict keys are the edge indices of the built edges, in order
        self.ops = nn.ModuleDict()
        for index, (name, source) in enumerate(self.edges):
            if index // 2 + 2 in needed:
                stride = 2 if reduction and source < 2 else 1
                self.ops[str(index)] = make_op(name, channels, stride)
        self.out_channels = len(self.concat) * channels

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        states: list[Tensor | None] = [
            self.preprocess0(s0) if self.preprocess0 is not None else None,
            self.preprocess1(s1) if self.preprocess1 is not None else None,
        ]
        for node in range(len(self.edges) // 2):
            first, second = str(2 * node), str(2 * node + 1)
            if first not in self.ops:
                states.append(None)
                continue
            a = states[self.edges[2 * node][1]]
            b = states[self.edges[2 * node + 1][1]]
            assert a is not None and b is not None  # needed nodes read needed states only
            states.append(self.ops[first](a) + self.ops[second](b))
        outputs = [states[i] for i in self.concat]
        return torch.cat([s for s in outputs if s is not None], dim=1)


class NASBNetwork(nn.Module):
    """A network of NASB cells built from a genotype.

    Args:
        genotype: a :class:`Genotype`, a dict (its :meth:`~Genotype.to_dict` form) or a path to
            its JSON file.
        channels: the first cells' channel count (doubled at each reduction cell).
        layers: cells in all (two of them reduction cells).
        num_classes: classifier outputs.
        in_channels: input image channels.
        stem: ``"cifar"`` (32x32 inputs) or ``"imagenet"`` (224x224: /4 before the cells).
        stem_multiplier: stem outputs are ``stem_multiplier * channels``.
    """

    def __init__(
        self,
        genotype: Genotype | Mapping[str, Any] | str | os.PathLike[str],
        channels: int = DEFAULT_CHANNELS,
        layers: int = DEFAULT_LAYERS,
        num_classes: int = 10,
        in_channels: int = 3,
        stem: str = "cifar",
        stem_multiplier: int = DEFAULT_STEM_MULTIPLIER,
    ) -> None:
        super().__init__()
        self.genotype = Genotype.load(genotype)
        _check_sizes(channels, layers, num_classes, in_channels, stem, stem_multiplier)
        c_stem = stem_multiplier * channels
        stem_layers: list[nn.Module]
        if stem == "imagenet":
            stem_layers = [nn.Conv2d(in_channels, c_stem, 7, 2, 3, bias=False)]
        else:
            stem_layers = [nn.Conv2d(in_channels, c_stem, 3, 1, 1, bias=False)]
        stem_layers.append(nn.BatchNorm2d(c_stem))
        if stem == "imagenet":
            stem_layers.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem_layers)

        c_prev_prev, c_prev, c_curr = c_stem, c_stem, channels
        reductions = reduction_layers(layers)
        reduction_prev = False
        cells = []
        for index in range(layers):
            reduction = index in reductions
            if reduction:
                c_curr *= 2
            g = self.genotype
            edges, concat = (
                (g.reduce, g.reduce_concat) if reduction else (g.normal, g.normal_concat)
            )
            cell = Cell(edges, concat, c_prev_prev, c_prev, c_curr, reduction, reduction_prev)
            cells.append(cell)
            c_prev_prev, c_prev = c_prev, cell.out_channels
            reduction_prev = reduction
        self.cells = nn.ModuleList(cells)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(self.pool(s1).flatten(1))


def _check_sizes(
    channels: int, layers: int, num_classes: int, in_channels: int, stem: str, multiplier: int
) -> None:
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; use one of {', '.join(STEMS)}")
    if channels < 2:
        raise ValueError(f"channels must be >= 2 (a factorised reduce halves them), got {channels}")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if num_classes < 1 or in_channels < 1 or multiplier < 1:
        raise ValueError("num_classes, in_channels and stem_multiplier must be >= 1")


# --- cost by formula -----------------------------------------------------------------------


def op_cost(name: str, channels: int, stride: int, height: int, width: int) -> tuple[int, int]:
    """(FLOPs, BOPs) per image of candidate ``name`` on a ``channels x height x width`` input.

    Binary convs are ``C * C * k * k`` BOPs per output pixel; a stride-2 ``skip_connect`` (the
    factorised reduce) ``C * C`` FLOPs per output pixel; pools, identity and zero cost nothing
    (the op counter counts convolutions and dense layers only).
    """
    pixels = math.ceil(height / stride) * math.ceil(width / stride)
    if name in BINARY_PRIMITIVES:
        k = _KERNELS[name]
        return 0, channels * channels * k * k * pixels
    if name == "skip_connect" and stride == 2:
        return channels * channels * pixels, 0
    return 0, 0


def analytic_cost(
    genotype: Genotype | Mapping[str, Any] | str | os.PathLike[str],
    channels: int = DEFAULT_CHANNELS,
    layers: int = DEFAULT_LAYERS,
    num_classes: int = 10,
    in_channels: int = 3,
    stem: str = "cifar",
    stem_multiplier: int = DEFAULT_STEM_MULTIPLIER,
    input_size: tuple[int, int] = (224, 224),
) -> tuple[int, int]:
    """(FLOPs, BOPs) per image of ``NASBNetwork(...)`` by formula, as the op counter counts them.

    Bi-Real's OPs are ``FLOPs + BOPs / 64``.
    """
    g = Genotype.load(genotype)
    _check_sizes(channels, layers, num_classes, in_channels, stem, stem_multiplier)
    h, w = input_size
    c_stem = stem_multiplier * channels
    if stem == "imagenet":
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        flops = in_channels * c_stem * 49 * h * w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    else:
        flops = in_channels * c_stem * 9 * h * w
    bops = 0
    c_prev_prev, c_prev, c_curr = c_stem, c_stem, channels
    reductions = reduction_layers(layers)
    size_prev = (h, w)  # the previous cell's output; a factorised reduce brings the older one here
    for index in range(layers):
        reduction = index in reductions
        if reduction:
            c_curr *= 2
        edges, concat = (g.reduce, g.reduce_concat) if reduction else (g.normal, g.normal_concat)
        needed = _needed(edges, concat)
        ih, iw = size_prev  # the cell's input resolution (both inputs, after preprocessing)
        if 0 in needed:
            flops += c_prev_prev * c_curr * ih * iw
        if 1 in needed:
            flops += c_prev * c_curr * ih * iw
        for edge, (name, source) in enumerate(edges):
            if edge // 2 + 2 in needed:
                stride = 2 if reduction and source < 2 else 1
                size = (ih, iw) if stride == 2 or not reduction else _half(ih, iw)
                f, b = op_cost(name, c_curr, stride, *size)
                flops, bops = flops + f, bops + b
        size_prev = _half(ih, iw) if reduction else (ih, iw)
        c_prev_prev, c_prev = c_prev, len(concat) * c_curr
    flops += c_prev * num_classes
    return flops, bops


def _half(h: int, w: int) -> tuple[int, int]:
    return math.ceil(h / 2), math.ceil(w / 2)
