"""What a derived network costs, as a differentiable function of the alphas.

The search steers toward a target cost in OPs (:mod:`models.ops`: FLOPs + BOPs / 64, counted at
224x224 as the papers report). The derived network's cost splits into two parts:

- the *fixed* part: stem, the preprocessing of cell inputs, the classifier. A derived genotype
  does not change it: both cells concatenate all their nodes (every cell's width is fixed),
  and node 0 has only the two cell inputs to choose from, so both are always read and
  preprocessed;
- the *edges*: each kept edge costs what its operation costs at that edge's shape, in every
  cell of its type (all normal cells share one genotype, all reduction cells another).

:func:`cost_table` prices every candidate on every edge with the op counter (one
:func:`models.count_ops` per distinct operation, channel count, stride and input size), and
measures the fixed part by counting one derived network and taking its edges off. It then counts
a second derived network to check that table and network agree: a supernet whose layout drifted
from :class:`models.nasb.NASBNetwork` fails there, not silently in a search.

:meth:`CostTable.expected` is the differentiable estimate used by the penalty. Per edge, the
weighted mean cost of the candidates other than ``none`` (softmax over them only: the
derivation never keeps ``none``, so counting it as free would reward a weight that never
reaches the derived network); per node, a soft choice of two edges: each edge's DARTS strength
(its largest non-``none`` weight) against the midpoint of the 2nd and 3rd strongest, through a
sigmoid, rescaled so the weights of a node sum to 2. When the alphas become decisive the
estimate becomes the derived network's exact cost; with equal alphas it is the mean over all
derivable networks' edges.

:func:`ops_penalty` is ``lam * (log(expected / target) / reach)^2`` with ``reach`` the space's
log-range, ``log(dearest / cheapest)`` (:attr:`CostTable.log_reach`). The log-ratio is symmetric
(twice the target costs as much as half of it) and scale-free; dividing by the reach makes
``lam`` mean the same in every space. Without it the penalty would be negligible here: the real
stem and preprocessing dominate a NASB network's OPs, so the genotype moves the total by some
25% at most and ``log(expected / target)^2`` never exceeds ~0.05, far below the cross-entropy
(a 4-epoch search at ``lam=1`` did not move the expected cost at all). With the reach, a
network at the far end of the range from the target pays ``lam`` nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import models
from models.nasb import Genotype, make_op

from .supernet import NONE, Supernet, edge_count, edge_inputs

__all__ = [
    "CostTable",
    "CostMismatchError",
    "check_target",
    "cost_table",
    "derived_network",
    "expected_ops",
    "ops_penalty",
]

#: Temperature of the soft choice of two edges per node (strengths are weights in [0, 1]).
EDGE_TEMPERATURE = 0.02
CELL_KINDS = ("normal", "reduce")


class CostMismatchError(RuntimeError):
    """The supernet prices edges differently from the network the genotype builds (a bug)."""


@dataclass(frozen=True)
class CostTable:
    """OPs of every candidate on every edge (summed over the cells of each type) + fixed part."""

    primitives: tuple[str, ...]
    nodes: int
    normal: Tensor  # edges x candidates, float64
    reduce: Tensor
    fixed: float
    input_size: int

    def _edges(self, kind: str) -> Tensor:
        return self.normal if kind == "normal" else self.reduce

    def of_genotype(self, genotype: Genotype) -> float:
        """The exact OPs of the network ``genotype`` builds (no counting: from the table)."""
        rows = {pair: row for row, pair in enumerate(edge_inputs(self.nodes))}
        total = self.fixed
        for kind, genes in (("normal", genotype.normal), ("reduce", genotype.reduce)):
            table = self._edges(kind)
            for index, (op, source) in enumerate(genes):
                total += float(table[rows[(index // 2, source)], self.primitives.index(op)])
        return total

    def bounds(self) -> tuple[float, float]:
        """OPs of the cheapest and of the most expensive derivable network."""
        low = high = self.fixed
        keep = [k for k, name in enumerate(self.primitives) if name != NONE]
        for kind in CELL_KINDS:
            table = self._edges(kind)[:, keep]
            offset = 0
            for i in range(self.nodes):
                rows = table[offset : offset + 2 + i]
                low += float(rows.min(dim=1).values.sort().values[:2].sum())
                high += float(rows.max(dim=1).values.sort(descending=True).values[:2].sum())
                offset += 2 + i
        return low, high

    @property
    def log_reach(self) -> float:
        """``log(dearest / cheapest)`` of the derivable networks (1.0 when they cost the same)."""
        low, high = self.bounds()
        return math.log(high / low) if high > low > 0 else 1.0

    def extreme_genotypes(self) -> tuple[Genotype, Genotype]:
        """The cheapest and the most expensive derivable genotypes (those of :meth:`bounds`)."""
        keep = [k for k, name in enumerate(self.primitives) if name != NONE]

        def pick(cheapest: bool) -> Genotype:
            cells = []
            for kind in CELL_KINDS:
                table = self._edges(kind)[:, keep]
                genes: list[tuple[str, int]] = []
                offset = 0
                for i in range(self.nodes):
                    rows = table[offset : offset + 2 + i]
                    values, columns = rows.min(dim=1) if cheapest else rows.max(dim=1)
                    order = values.argsort(descending=not cheapest, stable=True)[:2]
                    genes += [(self.primitives[keep[int(columns[j])]], int(j)) for j in order]
                    offset += 2 + i
                cells.append(tuple(genes))
            concat = tuple(range(2, 2 + self.nodes))
            return Genotype(
                normal=cells[0], normal_concat=concat, reduce=cells[1], reduce_concat=concat
            )

        return pick(True), pick(False)

    def expected(self, alphas_normal: Tensor, alphas_reduce: Tensor) -> Tensor:
        """Differentiable estimate of the derived network's OPs (see the module's doc)."""
        keep = torch.tensor([k for k, name in enumerate(self.primitives) if name != NONE])
        total = torch.tensor(self.fixed, dtype=torch.float64)
        for alphas, table in ((alphas_normal, self.normal), (alphas_reduce, self.reduce)):
            alphas = alphas.double()
            op_weights = torch.softmax(alphas[:, keep], dim=-1)
            edge_cost = (op_weights * table[:, keep]).sum(dim=-1)
            strength = torch.softmax(alphas, dim=-1)[:, keep].max(dim=-1).values
            offset = 0
            for i in range(self.nodes):
                span = slice(offset, offset + 2 + i)
                total = total + (_soft_top2(strength[span]) * edge_cost[span]).sum()
                offset += 2 + i
        return total


def _soft_top2(strength: Tensor) -> Tensor:
    """Weights summing to 2 that approach 1 on the two strongest edges and 0 elsewhere."""
    if strength.numel() <= 2:
        return torch.ones_like(strength)
    ranked = strength.detach().sort(descending=True).values
    threshold = 0.5 * (ranked[1] + ranked[2])
    soft = torch.sigmoid((strength - threshold) / EDGE_TEMPERATURE)
    return 2.0 * soft / soft.sum()


def _op_cost(name: str, channels: int, stride: int, size: tuple[int, int]) -> float:
    op = make_op(name, channels, stride)
    return models.count_ops(op, (1, channels, *size)).ops


def _cell_sizes(supernet: Supernet, input_size: int) -> list[tuple[int, int]]:
    """Height and width of each cell's inputs (after preprocessing) at ``input_size``."""
    was_training = supernet.stem.training
    try:
        with torch.no_grad():
            stem = supernet.stem.eval()(
                torch.zeros(1, supernet.in_channels, input_size, input_size)
            )
    finally:
        supernet.stem.train(was_training)
    height, width = int(stem.shape[2]), int(stem.shape[3])
    sizes = []
    for layout in supernet.layout:
        sizes.append((height, width))
        if layout.reduction:
            height, width = math.ceil(height / 2), math.ceil(width / 2)
    return sizes


def cost_table(supernet: Supernet, input_size: int = 224, *, check: bool = True) -> CostTable:
    """Price every candidate on every edge of ``supernet`` at ``input_size`` (see module doc).

    ``check`` counts the most expensive derivable network too and raises
    :class:`CostMismatchError` if the table misprices it.
    """
    nodes, names = supernet.nodes, supernet.primitives
    tables = {
        kind: torch.zeros(edge_count(nodes), len(names), dtype=torch.float64) for kind in CELL_KINDS
    }
    cache: dict[tuple[str, int, int, tuple[int, int]], float] = {}
    for layout, size in zip(supernet.layout, _cell_sizes(supernet, input_size), strict=True):
        kind = "reduce" if layout.reduction else "normal"
        half = (math.ceil(size[0] / 2), math.ceil(size[1] / 2)) if layout.reduction else size
        for row, (_, source) in enumerate(edge_inputs(nodes)):
            stride = 2 if layout.reduction and source < 2 else 1
            shape = size if source < 2 else half
            for column, name in enumerate(names):
                key = (name, layout.channels, stride, shape)
                if key not in cache:
                    cache[key] = _op_cost(*key)
                tables[kind][row, column] += cache[key]
    partial = CostTable(names, nodes, tables["normal"], tables["reduce"], 0.0, input_size)
    cheapest, dearest = partial.extreme_genotypes()
    fixed = _count(supernet, cheapest, input_size) - partial.of_genotype(cheapest)
    table = CostTable(names, nodes, tables["normal"], tables["reduce"], fixed, input_size)
    if check:
        counted = _count(supernet, dearest, input_size)
        priced = table.of_genotype(dearest)
        if not math.isclose(counted, priced, rel_tol=1e-6, abs_tol=1.0):
            raise CostMismatchError(
                f"the supernet prices genotype {dearest.to_dict()} at {priced:.6g} OPs but the "
                f"network it builds counts {counted:.6g}: the supernet's layout differs from "
                "models.nasb.NASBNetwork's"
            )
    return table


def derived_network(supernet: Supernet, genotype: Genotype) -> torch.nn.Module:
    """The network ``genotype`` builds with the supernet's width, depth, classes and stem."""
    return models.create("nasb", genotype=genotype.to_dict(), **supernet.network_args())


def _count(supernet: Supernet, genotype: Genotype, input_size: int) -> float:
    net = derived_network(supernet, genotype)
    return models.count_ops(net, (1, supernet.in_channels, input_size, input_size)).ops


def expected_ops(
    supernet: Supernet, input_size: int = 224, table: CostTable | None = None
) -> Tensor:
    """The supernet's differentiable OPs estimate (builds the cost table unless given one)."""
    table = table if table is not None else cost_table(supernet, input_size)
    return table.expected(supernet.alphas_normal, supernet.alphas_reduce)


def ops_penalty(expected: Tensor, target: float, lam: float, reach: float = 1.0) -> Tensor:
    """``lam * (log(expected / target) / reach)^2``: zero at the target, the same for x2 and x0.5.

    ``reach`` is the space's log-range (:attr:`CostTable.log_reach`, see the module's doc).
    """
    return lam * (torch.log(expected / target) / reach) ** 2


def _rounded(value: float, up: bool) -> str:
    """``value`` to 4 significant digits, rounded outward, so a copied bound is in range."""
    if value <= 0:
        return f"{value:.4g}"
    scale = 10.0 ** (math.floor(math.log10(value)) - 3)
    steps = math.ceil(value / scale) if up else math.floor(value / scale)
    return f"{steps * scale:.4g}"


def check_target(table: CostTable, target: float) -> None:
    """Raise ValueError (one line) when ``target`` is outside what the space can derive.

    The range in the message is rounded outward (low down, high up), and targets within that
    rounding of a bound are accepted, so a number copied from the message is always taken.
    """
    low, high = table.bounds()
    floor, ceiling = float(_rounded(low, up=False)), float(_rounded(high, up=True))
    if not (math.isfinite(target) and floor <= target <= ceiling):
        raise ValueError(
            f"--target-ops {target:.4g} is out of reach: this space's derived networks cost "
            f"{_rounded(low, up=False)} to {_rounded(high, up=True)} OPs at "
            f"{table.input_size}x{table.input_size}; choose a target in that range, or change "
            "--cells/--channels"
        )
