"""The search space as one network: mixed operations, a search cell and the supernet.

DARTS (Liu, Simonyan, Yang, ICLR 2019) relaxes the choice of an operation on an edge into a
weighted sum: every candidate runs, and the outputs are added with weights ``softmax(alpha)``,
where ``alpha`` is one row of architecture parameters per edge. A cell is a DAG of ``nodes``
intermediate nodes; node ``i`` sums a mixed operation on *every* earlier state (the two cell
inputs and nodes ``0..i-1``), so a cell has ``sum(2 + i)`` edges (14 for 4 nodes). All normal
cells share one alpha matrix, all reduction cells another, so the search finds two cell types,
exactly what a :class:`models.nasb.Genotype` records.

The supernet mirrors the derived network (:class:`models.nasb.NASBNetwork`) layer for layer:
the same stem, the same cell sequence with reduction cells at 1/3 and 2/3 of the depth, the
same preprocessing of cell inputs (:func:`models.nasb.preprocess`) and the same candidate
operations (:func:`models.nasb.make_op`, binary as built there: the search trains binary weights
through their straight-through estimators, as the derived network will). Only the edges differ:
a mixed operation here, one chosen operation there. :mod:`toolkit.search.cost` relies on this to
price each edge's candidates at the derived network's shapes.

:func:`derive_genotype` turns the alphas into a genotype by DARTS's rule: per node, keep the two
incoming edges whose strongest non-``none`` operation has the largest weight, and on each keep
that operation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from models.nasb import PRIMITIVES, Genotype, make_op, preprocess
from models.nasb.network import (
    DEFAULT_CHANNELS,
    DEFAULT_LAYERS,
    DEFAULT_STEM_MULTIPLIER,
    NASBNetwork,
    reduction_layers,
)

__all__ = [
    "CellLayout",
    "MixedOp",
    "OpFactory",
    "check_primitives",
    "SearchCell",
    "Supernet",
    "derive_genotype",
    "edge_count",
    "edge_inputs",
    "NONE",
]

#: The zero operation: a candidate during the search, never kept by the derivation rule.
NONE = "none"


def edge_count(nodes: int) -> int:
    """Edges of a search cell with ``nodes`` intermediate nodes: node i has 2 + i inputs."""
    return sum(2 + i for i in range(nodes))


def edge_inputs(nodes: int) -> list[tuple[int, int]]:
    """``(node, input state)`` of every edge, in alpha-row order (node by node, input ascending)."""
    return [(i, j) for i in range(nodes) for j in range(2 + i)]


def check_primitives(
    primitives: Sequence[str], known: Sequence[str] = PRIMITIVES
) -> tuple[str, ...]:
    """``primitives`` as a tuple, or a one-line ValueError: unknown, repeated or only 'none'."""
    names = tuple(primitives)
    unknown = [p for p in names if p not in known]
    if unknown:
        raise ValueError(f"unknown operation {unknown[0]!r}; known operations: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"candidate operations repeat: {', '.join(names)}")
    if not [p for p in names if p != NONE]:
        raise ValueError("the candidate operations need at least one besides 'none'")
    return names


#: Builds one candidate operation: ``make(name, channels, stride) -> module``.
OpFactory = Callable[[str, int, int], nn.Module]


class MixedOp(nn.Module):
    """``sum_k w_k * op_k(x)`` over the candidates, ``w`` one row of ``softmax(alpha)``.

    Every candidate is built by ``make(name, channels, stride)`` (by default
    :func:`models.nasb.make_op`, the binary cells' operations) in the order of ``primitives``
    (by default all of :data:`models.nasb.PRIMITIVES`), which is the column order of the alphas.
    Another search space passes its own ``make`` and its ``known`` names: the data-free
    generator search (:mod:`toolkit.datafree.autorecon`) mixes float generator operations.
    """

    def __init__(
        self,
        channels: int,
        stride: int,
        primitives: Sequence[str] = PRIMITIVES,
        *,
        make: OpFactory = make_op,
        known: Sequence[str] = PRIMITIVES,
    ) -> None:
        super().__init__()
        self.primitives = check_primitives(primitives, known)
        self.ops = nn.ModuleList(make(name, channels, stride) for name in self.primitives)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        if weights.shape != (len(self.ops),):
            raise ValueError(
                f"a mixed op of {len(self.ops)} candidates needs {len(self.ops)} weights, "
                f"got shape {tuple(weights.shape)}"
            )
        out = weights[0] * self.ops[0](x)
        for w, op in zip(weights[1:], self.ops[1:], strict=True):
            out = out + w * op(x)
        return out


@dataclass(frozen=True)
class CellLayout:
    """Where one cell sits: its channel count, whether it reduces, and what feeds it."""

    channels: int
    reduction: bool
    reduction_prev: bool
    c_prev_prev: int
    c_prev: int


class SearchCell(nn.Module):
    """A DARTS cell whose every edge is a :class:`MixedOp`; output: all nodes concatenated."""

    def __init__(self, layout: CellLayout, nodes: int, primitives: Sequence[str]) -> None:
        super().__init__()
        self.layout = layout
        self.nodes = nodes
        c = layout.channels
        self.preprocess0 = preprocess(layout.c_prev_prev, c, reduce=layout.reduction_prev)
        self.preprocess1 = preprocess(layout.c_prev, c)
        self.edges = nn.ModuleList(
            MixedOp(c, 2 if layout.reduction and j < 2 else 1, primitives)
            for _, j in edge_inputs(nodes)
        )

    def forward(self, s0: Tensor, s1: Tensor, weights: Tensor) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for i in range(self.nodes):
            inputs = len(states)
            node = self.edges[offset](states[0], weights[offset])
            for j in range(1, inputs):
                node = node + self.edges[offset + j](states[j], weights[offset + j])
            offset += 2 + i
            states.append(node)
        return torch.cat(states[2:], dim=1)


class Supernet(nn.Module):
    """Every derivable NASB network at once: the stacked search cells plus the alphas.

    Args:
        channels: channels of the first cells (doubled at each reduction), as ``NASBNetwork``.
        layers: cells in the stack; reduction cells at 1/3 and 2/3 of it.
        nodes: intermediate nodes per cell (4 in DARTS).
        num_classes, in_channels, stem: as :class:`models.nasb.NASBNetwork`.
        primitives: the candidate operations (default: all of ``PRIMITIVES``); a subset makes a
            smaller space (fewer columns of alphas).

    ``alphas_normal`` and ``alphas_reduce`` (edges x candidates) start near zero (DARTS: 1e-3
    times a standard normal), so every candidate starts with about the same weight.
    """

    def __init__(
        self,
        channels: int = DEFAULT_CHANNELS,
        layers: int = DEFAULT_LAYERS,
        nodes: int = 4,
        num_classes: int = 10,
        in_channels: int = 3,
        stem: str = "cifar",
        primitives: Sequence[str] = PRIMITIVES,
    ) -> None:
        super().__init__()
        if channels < 2 or layers < 1 or nodes < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                "a supernet needs channels >= 2 and layers, nodes, num_classes, in_channels >= 1"
            )
        self.primitives = check_primitives(primitives)
        self.channels, self.layers, self.nodes = channels, layers, nodes
        self.num_classes, self.in_channels, self.stem_kind = num_classes, in_channels, stem
        shape = (edge_count(nodes), len(self.primitives))
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(shape))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(shape))
        self.stem = self._stem()
        self.layout = self._layout(DEFAULT_STEM_MULTIPLIER * channels)
        self.cells = nn.ModuleList(SearchCell(cell, nodes, self.primitives) for cell in self.layout)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(nodes * self.layout[-1].channels, num_classes)

    def _stem(self) -> nn.Module:
        """The derived network's own stem: taken from a one-cell ``NASBNetwork``, not copied."""
        one_cell = NASBNetwork(
            self.derive_genotype(),
            channels=self.channels,
            layers=1,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            stem=self.stem_kind,
        )
        return one_cell.stem

    def _layout(self, c_stem: int) -> list[CellLayout]:
        reductions = reduction_layers(self.layers)
        cells: list[CellLayout] = []
        c_prev_prev, c_prev, c = c_stem, c_stem, self.channels
        reduction_prev = False
        for index in range(self.layers):
            reduction = index in reductions
            if reduction:
                c *= 2
            cells.append(CellLayout(c, reduction, reduction_prev, c_prev_prev, c_prev))
            c_prev_prev, c_prev = c_prev, self.nodes * c
            reduction_prev = reduction
        return cells

    def forward(self, x: Tensor) -> Tensor:
        normal = torch.softmax(self.alphas_normal, dim=-1)
        reduce = torch.softmax(self.alphas_reduce, dim=-1)
        s0 = s1 = self.stem(x)
        for cell, layout in zip(self.cells, self.layout, strict=True):
            s0, s1 = s1, cell(s0, s1, reduce if layout.reduction else normal)
        return self.classifier(self.pool(s1).flatten(1))

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters: ``[alphas_normal, alphas_reduce]``."""
        return [self.alphas_normal, self.alphas_reduce]

    def weight_modules(self) -> nn.ModuleList:
        """Every module that holds weights, without the alphas: what the weight optimizer sees.

        The list holds the supernet's own modules (no copies), so an optimizer made with
        :func:`models.training.make_optimizer` on it updates the supernet.
        """
        return nn.ModuleList([self.stem, self.cells, self.classifier])

    def derive_genotype(self) -> Genotype:
        """The genotype DARTS's rule picks from the current alphas (see :func:`derive_genotype`)."""
        return derive_genotype(
            self.alphas_normal.detach(), self.alphas_reduce.detach(), self.nodes, self.primitives
        )

    def network_args(self) -> dict[str, Any]:
        """Keyword arguments of ``models.create("nasb", genotype=..., **args)`` for the same net."""
        return {
            "channels": self.channels,
            "layers": self.layers,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "stem": self.stem_kind,
        }


def _derive_cell(
    alphas: Tensor, nodes: int, primitives: Sequence[str]
) -> tuple[tuple[str, int], ...]:
    weights = torch.softmax(alphas.detach().float(), dim=-1)
    keep = [k for k, name in enumerate(primitives) if name != NONE]
    genes: list[tuple[str, int]] = []
    offset = 0
    for i in range(nodes):
        rows = weights[offset : offset + 2 + i]
        # each edge's strongest non-"none" candidate: (weight, column); ties go to the first
        best = [max((float(row[k]), -k) for k in keep) for row in rows]
        order = sorted(range(2 + i), key=lambda j: (-best[j][0], j))
        for j in order[:2]:
            genes.append((primitives[-best[j][1]], j))
        offset += 2 + i
    return tuple(genes)


def derive_genotype(
    alphas_normal: Tensor,
    alphas_reduce: Tensor,
    nodes: int = 4,
    primitives: Sequence[str] = PRIMITIVES,
) -> Genotype:
    """DARTS's rule: per node, the two strongest incoming edges, each with its strongest op.

    An edge's strength is the largest ``softmax(alpha)`` weight among its candidates other than
    ``none`` (the softmax runs over all candidates, ``none`` included, as in DARTS); the kept
    edges are listed strongest first, ties going to the lower input. ``none`` is never chosen.
    Both cells concatenate all their intermediate nodes.
    """
    names = check_primitives(primitives)
    expected = (edge_count(nodes), len(names))
    for label, alphas in (("alphas_normal", alphas_normal), ("alphas_reduce", alphas_reduce)):
        if tuple(alphas.shape) != expected:
            raise ValueError(
                f"{label} must be {expected[0]} edges x {expected[1]} candidates for {nodes} "
                f"nodes, got shape {tuple(alphas.shape)}"
            )
    concat = tuple(range(2, 2 + nodes))
    return Genotype(
        normal=_derive_cell(alphas_normal, nodes, names),
        normal_concat=concat,
        reduce=_derive_cell(alphas_reduce, nodes, names),
        reduce_concat=concat,
    )
