"""A NASB genotype: the chosen normal and reduction cells, as a human-readable JSON document.

DARTS's convention. A cell has two inputs (states 0 and 1: the outputs of the two previous
cells) and N intermediate nodes (states 2 .. N+1). Node i takes exactly two edges, entries
``2i`` and ``2i+1`` of the cell's list, each ``[operation, input state]`` with the input an
earlier state (``< i + 2``); the node adds its two edges' outputs. The cell's output
concatenates the states listed in ``*_concat`` (default: every intermediate node)::

    {
      "normal": [["bin_conv_3x3", 0], ["skip_connect", 1],
                 ["bin_conv_3x3", 1], ["bin_dil_conv_3x3", 2], ...],
      "normal_concat": [2, 3, 4, 5],
      "reduce": [["max_pool_3x3", 0], ["bin_conv_5x5", 1], ...],
      "reduce_concat": [2, 3, 4, 5]
    }

Operations are the names in :data:`models.nasb.PRIMITIVES`. Both cells have the same number of
nodes. Everything a genotype can get wrong is caught when it is made (:meth:`Genotype.from_dict`,
the constructor, :meth:`Genotype.load`) and reported as one :class:`GenotypeError` line naming
the cell, the edge and what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitfleet.errors import BitfleetError
from bitfleet.fsutil import atomic_write_text

from .space import PRIMITIVES, unknown_op_message

__all__ = ["Genotype", "GenotypeError", "Edge"]

Edge = tuple[str, int]
_KEYS = ("normal", "normal_concat", "reduce", "reduce_concat")


class GenotypeError(BitfleetError, ValueError):
    """A genotype that names an unknown operation, a wrong node index, or is malformed."""


def _edges(cell: str, raw: Any) -> tuple[Edge, ...]:
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence):
        raise GenotypeError(
            f"genotype {cell!r} must be a list of [operation, input] pairs, got {raw!r}"
        )
    edges: list[Edge] = []
    for index, entry in enumerate(raw):
        if isinstance(entry, str | bytes) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise GenotypeError(
                f"genotype {cell} edge {index}: expected [operation, input], got {entry!r}"
            )
        op, source = entry
        if not isinstance(op, str) or op not in PRIMITIVES:
            raise GenotypeError(f"genotype {cell} edge {index}: {unknown_op_message(op)}")
        if isinstance(source, bool) or not isinstance(source, int):
            raise GenotypeError(
                f"genotype {cell} edge {index}: the input must be an integer state index, "
                f"got {source!r}"
            )
        edges.append((op, source))
    if not edges or len(edges) % 2:
        raise GenotypeError(
            f"genotype {cell} has {len(edges)} edges; each node takes exactly two, so a cell "
            "needs a positive even number of edges"
        )
    for index, (_, source) in enumerate(edges):
        node = index // 2
        if not 0 <= source < node + 2:
            raise GenotypeError(
                f"genotype {cell} edge {index} (node {node}) takes input {source}, but node "
                f"{node} can only take 0..{node + 1} (0 and 1: the cell's inputs; "
                "2 and up: earlier nodes)"
            )
    return tuple(edges)


def _concat(cell: str, raw: Any, nodes: int) -> tuple[int, ...]:
    if raw is None:
        return tuple(range(2, nodes + 2))
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence) or not raw:
        raise GenotypeError(
            f"genotype {cell}_concat must be a non-empty list of node states, got {raw!r}"
        )
    states: list[int] = []
    for value in raw:
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value < nodes + 2:
            raise GenotypeError(
                f"genotype {cell}_concat names state {value!r}, but the cell's nodes are "
                f"states 2..{nodes + 1}"
            )
        if value in states:
            raise GenotypeError(f"genotype {cell}_concat names state {value} twice")
        states.append(value)
    return tuple(states)


@dataclass(frozen=True)
class Genotype:
    """The two cells of a NASB network (see the module's doc for the convention).

    Construct it from plain data with :meth:`from_dict` or :meth:`load`; the constructor
    validates too and turns lists into tuples, so equal genotypes compare and hash equal.
    """

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...] = field(default=())
    reduce: tuple[Edge, ...] = field(default=())
    reduce_concat: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        normal = _edges("normal", self.normal)
        reduce = _edges("reduce", self.reduce)
        if len(normal) != len(reduce):
            raise GenotypeError(
                f"genotype normal has {len(normal) // 2} nodes but reduce has "
                f"{len(reduce) // 2}; both cells need the same number of nodes"
            )
        nodes = len(normal) // 2
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "normal", normal)
        set_(self, "reduce", reduce)
        set_(self, "normal_concat", _concat("normal", self.normal_concat or None, nodes))
        set_(self, "reduce_concat", _concat("reduce", self.reduce_concat or None, nodes))

    @property
    def nodes(self) -> int:
        """Intermediate nodes per cell."""
        return len(self.normal) // 2

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: ``{"normal": [[op, input], ...], "normal_concat": [...], ...}``."""
        return {
            "normal": [[op, source] for op, source in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[op, source] for op, source in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Genotype:
        """Validate plain data (as :meth:`to_dict` writes it); one GenotypeError line if bad."""
        if not isinstance(data, Mapping):
            raise GenotypeError(
                f"a genotype must be a mapping with keys {', '.join(_KEYS)}, "
                f"got {type(data).__name__}"
            )
        unknown = sorted(str(k) for k in data if k not in _KEYS)
        if unknown:
            raise GenotypeError(
                f"unknown genotype key(s) {', '.join(unknown)}; a genotype has {', '.join(_KEYS)}"
            )
        for key in ("normal", "reduce"):
            if key not in data:
                raise GenotypeError(f"a genotype needs {key!r}: a list of [operation, input]")
        for key in ("normal_concat", "reduce_concat"):
            if key in data and data[key] in ([], ()):
                raise GenotypeError(
                    f"genotype {key} is empty; list the node states the cell outputs, or leave "
                    "it out to concatenate every node"
                )
        return cls(
            normal=data["normal"],
            normal_concat=data.get("normal_concat") or (),
            reduce=data["reduce"],
            reduce_concat=data.get("reduce_concat") or (),
        )

    @classmethod
    def load(cls, source: Genotype | Mapping[str, Any] | str | os.PathLike[str]) -> Genotype:
        """A genotype from a Genotype, a dict, or a path to a JSON file."""
        if isinstance(source, Genotype):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        if not isinstance(source, str | os.PathLike):
            raise GenotypeError(
                f"a genotype is a dict or a path to a JSON file, not {type(source).__name__}"
            )
        path = Path(source)
        if not path.is_file():
            raise GenotypeError(f"genotype file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise GenotypeError(f"genotype file {path} is not JSON: {err}") from None
        try:
            return cls.from_dict(data)
        except GenotypeError as err:
            raise GenotypeError(f"{path}: {err}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the genotype as indented JSON, atomically; return the path."""
        target = Path(path)
        atomic_write_text(target, self.to_json())
        return target

    def to_json(self) -> str:
        """The JSON text :meth:`save` writes: one edge per line, easy to read and diff."""
        data = self.to_dict()
        lines = ["{"]
        for index, key in enumerate(_KEYS):
            value = data[key]
            if key in ("normal", "reduce"):
                edges = ",\n".join(f"    {json.dumps(edge)}" for edge in value)
                text = f"[\n{edges}\n  ]"
            else:
                text = json.dumps(value)
            comma = "," if index < len(_KEYS) - 1 else ""
            lines.append(f"  {json.dumps(key)}: {text}{comma}")
        lines.append("}")
        return "\n".join(lines) + "\n"
