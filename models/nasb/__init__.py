"""NASB: binary cells found by architecture search (Zhu, Al-Ars, Hofstee, IJCNN 2020).

- :mod:`.space`: the candidate operations (:data:`PRIMITIVES`, :func:`make_op`) and a cell
  input's :func:`preprocess`, shared by the search's supernet and the derived network;
- :mod:`.genotype`: :class:`Genotype`, the chosen cells as human-readable JSON;
- :mod:`.network`: :class:`NASBNetwork`, the cells of a genotype stacked into a network, and
  :func:`analytic_cost`, its FLOPs and BOPs by formula;
- :mod:`.sample`: :func:`random_genotype`, the random baseline of a search;
- :mod:`.zoo`: the registered ``nasb`` model (``models.create("nasb", genotype=...)``) and
  ``nasb_a``, the cell bitfleet's own search found (:data:`NASB_A`).

Example::

    from models.nasb import PRIMITIVES, Genotype, make_op
    op = make_op("bin_dil_conv_3x3", channels=16, stride=2)
    g = Genotype.load("genotype.json")
"""

from .genotype import Edge, Genotype, GenotypeError
from .network import Cell, NASBNetwork, analytic_cost, op_cost, reduction_layers
from .sample import random_genotype
from .space import (
    BINARY_PRIMITIVES,
    PRIMITIVES,
    BinaryConvOp,
    FactorizedReduce,
    Zero,
    make_op,
    preprocess,
)
from .zoo import BASELINE, NASB_A, NASB_A_CHANNELS, nasb, nasb_a

__all__ = [
    "BASELINE",
    "BINARY_PRIMITIVES",
    "NASB_A",
    "NASB_A_CHANNELS",
    "PRIMITIVES",
    "BinaryConvOp",
    "Cell",
    "Edge",
    "FactorizedReduce",
    "Genotype",
    "GenotypeError",
    "NASBNetwork",
    "Zero",
    "analytic_cost",
    "make_op",
    "nasb",
    "nasb_a",
    "op_cost",
    "preprocess",
    "random_genotype",
    "reduction_layers",
]
