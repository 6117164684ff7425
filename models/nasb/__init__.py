"""NASB: binary cells found by architecture search (Zhu, Al-Ars, Hofstee, IJCNN 2020).

- :mod:`.space`: the candidate operations (:data:`PRIMITIVES`, :func:`make_op`) and a cell
  input's :func:`preprocess`, shared by the search's supernet and the derived network;
- :mod:`.genotype`: :class:`Genotype`, the chosen cells as human-readable JSON.

Example::

    from models.nasb import PRIMITIVES, Genotype, make_op
    op = make_op("bin_dil_conv_3x3", channels=16, stride=2)
    g = Genotype.load("genotype.json")
"""

from .genotype import Edge, Genotype, GenotypeError
from .space import (
    BINARY_PRIMITIVES,
    PRIMITIVES,
    BinaryConvOp,
    FactorizedReduce,
    Zero,
    make_op,
    preprocess,
)

__all__ = [
    "BINARY_PRIMITIVES",
    "PRIMITIVES",
    "BinaryConvOp",
    "Edge",
    "FactorizedReduce",
    "Genotype",
    "GenotypeError",
    "Zero",
    "make_op",
    "preprocess",
]
