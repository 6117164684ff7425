"""Differentiable architecture search of binary cells (NASB: DARTS on a binary supernet).

- :mod:`.supernet`: :class:`MixedOp`, the search cell, :class:`Supernet` (alphas and
  :meth:`~Supernet.derive_genotype`, DARTS's rule);
- :mod:`.cost`: the derived network's OPs as a differentiable function of the alphas
  (:func:`expected_ops`), priced with the op counter, and the penalty toward a target;
- :mod:`.run`: :func:`search`, the first-order bi-level loop with resumable checkpoints
  (:mod:`.state`) and ``alphas.png`` (:mod:`.plot`).

Example::

    from toolkit.search import SearchConfig, search
    result = search(SearchConfig(dataset="digits-hard", target_ops=1.7e8, epochs=10), "runs/s")
    models.create("nasb", genotype=result.genotype.to_dict(), **result.network)

The command line is ``bitfleet search`` (docs/nasb.md, "Search").
"""

from .cost import CostTable, cost_table, expected_ops, ops_penalty
from .run import COST_INPUT_SIZE, SPACES, SearchConfig, SearchResult, search
from .supernet import MixedOp, SearchCell, Supernet, derive_genotype

__all__ = [
    "COST_INPUT_SIZE",
    "SPACES",
    "CostTable",
    "MixedOp",
    "SearchCell",
    "SearchConfig",
    "SearchResult",
    "Supernet",
    "cost_table",
    "derive_genotype",
    "expected_ops",
    "ops_penalty",
    "search",
]
