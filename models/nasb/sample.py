"""Random genotypes: the baseline every architecture search has to beat.

Li and Talwalkar (2019) and Yang et al. (2020) showed that in DARTS-like spaces a randomly
sampled cell, trained the same way, often comes close to a searched one; a search claim means
little without that baseline. :func:`random_genotype` samples what DARTS's derivation rule can
produce: per node two edges from *different* earlier states, each carrying one candidate other
than ``none`` (a derived network never holds ``none``), drawn uniformly and independently for
the normal and the reduction cell.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .genotype import Edge, Genotype
from .space import PRIMITIVES, unknown_op_message

__all__ = ["random_genotype"]

_NONE = "none"


def _random_cell(rng: random.Random, nodes: int, ops: Sequence[str]) -> list[Edge]:
    edges: list[Edge] = []
    for node in range(nodes):
        for state in sorted(rng.sample(range(node + 2), 2)):
            edges.append((rng.choice(ops), state))
    return edges


def random_genotype(
    seed: int | random.Random, nodes: int = 4, ops: Sequence[str] | None = None
) -> Genotype:
    """A uniformly random genotype of ``nodes`` nodes per cell over ``ops`` (default: all but none).

    ``seed`` is an int (the same int gives the same genotype) or a :class:`random.Random` to
    draw several from one stream. ValueError for fewer than one node or an unknown operation.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    candidates = [op for op in (ops if ops is not None else PRIMITIVES) if op != _NONE]
    for op in candidates:
        if op not in PRIMITIVES:
            raise ValueError(unknown_op_message(op))
    if not candidates:
        raise ValueError("ops must hold at least one operation other than 'none'")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    normal = _random_cell(rng, nodes, candidates)
    reduce = _random_cell(rng, nodes, candidates)
    return Genotype.from_dict({"normal": normal, "reduce": reduce})
