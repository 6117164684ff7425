"""AutoReCon's searched generator: a generator supernet, its genotype and the derived generator.

AutoReCon (Zhu et al., IJCAI 2021) searches the generator's architecture with the same
reconstruction loss GDFQ trains its generator with, then retrains the found generator and
distils the student from its images. The paper's full text is not at hand; this module follows
our reading of a public re-implementation, and the search is DARTS's (our choice, made with the
NASB search's own :class:`toolkit.search.MixedOp`):

- the noise times the class embedding goes through a linear layer to a ``64 x s/8 x s/8`` map;
- **3 cells**, each doubling the resolution: a mixed upsampling (``nearest`` or ``bilinear``)
  to ``s0``, then two nodes, ``n1 = e0(s0)`` and ``n2 = e1(s0) + e2(n1)``, and the cell's output
  ``s0 + n2`` (the residual keeps a cell whose edges learn little harmless);
- every edge first applies a **class-conditional batch norm** (per-class scale and shift) and a
  ReLU to its input, then a mixed operation over the candidates :data:`GENERATOR_OPS`: none,
  skip, conv 1x1 / 3x3 / 5x5, dilated conv 3x3 / 5x5, all with 64 channels;
- the tail is GDFQ's: conditional batch norm, ReLU, 3x3 conv to the image channels, ``tanh``
  and a batch norm without affine parameters.

The derivation keeps, per edge, the strongest candidate other than ``none`` and, per cell, the
stronger upsampling (DARTS's rule on a cell whose two nodes take every possible input anyway).
A :class:`GeneratorGenotype` is plain JSON (``generator.json`` of a compression run).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitfleet.errors import BitfleetError
from models.nasb import Zero
from toolkit.search import MixedOp

from .generators import LATENT_DIM, ConditionalGenerator

__all__ = [
    "CELLS",
    "EDGES",
    "GENERATOR_OPS",
    "UPSAMPLES",
    "CellChoice",
    "ConditionalBatchNorm2d",
    "GeneratorGenotype",
    "GenotypeError",
    "SearchedGenerator",
    "make_generator_op",
    "random_genotype",
]

#: Candidate operations of every edge, in alpha-column order.
GENERATOR_OPS = ("none", "skip", "conv_1x1", "conv_3x3", "conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
#: Candidate upsamplings of every cell.
UPSAMPLES = ("nearest", "bilinear")
#: Cells of the generator (each doubles the resolution) and edges per cell.
CELLS, EDGES = 3, 3
#: Channels of every cell.
WIDTH = 64


class GenotypeError(BitfleetError, ValueError):
    """A generator genotype that does not describe a generator of this space."""


def make_generator_op(name: str, channels: int, stride: int = 1) -> nn.Module:
    """One candidate operation of a generator edge (resolution-preserving, ``stride`` 1)."""
    if stride != 1:
        raise ValueError(f"generator operations keep the resolution (stride 1), got {stride}")
    if name == "none":
        return Zero(1)
    if name == "skip":
        return nn.Identity()
    kinds = {
        "conv_1x1": (1, 1),
        "conv_3x3": (3, 1),
        "conv_5x5": (5, 1),
        "dil_conv_3x3": (3, 2),
        "dil_conv_5x5": (5, 2),
    }
    if name not in kinds:
        raise ValueError(f"unknown generator operation {name!r}; known: {', '.join(GENERATOR_OPS)}")
    kernel, dilation = kinds[name]
    return nn.Conv2d(
        channels, channels, kernel, padding=dilation * (kernel // 2), dilation=dilation
    )


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose scale and shift are looked up by class (starting at 1 and 0)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.scale = nn.Embedding(num_classes, channels)
        self.shift = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        gamma = self.scale(labels)[:, :, None, None]
        beta = self.shift(labels)[:, :, None, None]
        return self.norm(x) * gamma + beta


@dataclass(frozen=True)
class CellChoice:
    """One derived cell: its upsampling and the operation of each of its edges."""

    upsample: str
    edges: tuple[str, ...]


@dataclass(frozen=True)
class GeneratorGenotype:
    """A derived generator: one :class:`CellChoice` per cell."""

    cells: tuple[CellChoice, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"cells": [{"upsample": c.upsample, "edges": list(c.edges)} for c in self.cells]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GeneratorGenotype:
        """Parse and check a genotype dict; one-line :class:`GenotypeError` when it is wrong."""
        cells = data.get("cells") if isinstance(data, Mapping) else None
        if not isinstance(cells, list) or len(cells) != CELLS:
            raise GenotypeError(f"a generator genotype needs 'cells': a list of {CELLS} cells")
        parsed = []
        for index, cell in enumerate(cells):
            if not isinstance(cell, Mapping):
                raise GenotypeError(f"cell {index} must be an object with upsample and edges")
            upsample, edges = cell.get("upsample"), cell.get("edges")
            if upsample not in UPSAMPLES:
                raise GenotypeError(
                    f"cell {index}: upsample {upsample!r} is not one of {', '.join(UPSAMPLES)}"
                )
            if not isinstance(edges, list) or len(edges) != EDGES:
                raise GenotypeError(f"cell {index}: 'edges' must list {EDGES} operations")
            unknown = [e for e in edges if e not in GENERATOR_OPS]
            if unknown:
                raise GenotypeError(
                    f"cell {index}: unknown operation {unknown[0]!r}; known: "
                    f"{', '.join(GENERATOR_OPS)}"
                )
            parsed.append(CellChoice(str(upsample), tuple(str(e) for e in edges)))
        return cls(tuple(parsed))


def random_genotype(seed: int, primitives: Sequence[str] = GENERATOR_OPS) -> GeneratorGenotype:
    """A generator drawn uniformly from the space (every edge any op but ``none``).

    The baseline a search must beat to show that it searched: the same space, retrained the
    same way, without the search.
    """
    rng = random.Random(seed)
    ops = [name for name in primitives if name != "none"]
    cells = tuple(
        CellChoice(rng.choice(UPSAMPLES), tuple(rng.choice(ops) for _ in range(EDGES)))
        for _ in range(CELLS)
    )
    return GeneratorGenotype(cells)


def _upsample(x: Tensor, mode: str) -> Tensor:
    if mode == "bilinear":
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return F.interpolate(x, scale_factor=2, mode="nearest")


class _Cell(nn.Module):
    """One generator cell; its edges are mixed ops (search) or single ops (derived)."""

    def __init__(self, num_classes: int, choice: CellChoice | None, primitives: Sequence[str]):
        super().__init__()
        self.choice = choice
        self.norms = nn.ModuleList(ConditionalBatchNorm2d(WIDTH, num_classes) for _ in range(EDGES))
        if choice is None:
            self.edges = nn.ModuleList(
                MixedOp(WIDTH, 1, primitives, make=make_generator_op, known=GENERATOR_OPS)
                for _ in range(EDGES)
            )
        else:
            self.edges = nn.ModuleList(make_generator_op(name, WIDTH) for name in choice.edges)

    def _edge(self, index: int, x: Tensor, labels: Tensor, weights: Tensor | None) -> Tensor:
        h = F.relu(self.norms[index](x, labels))
        if weights is None:
            return self.edges[index](h)
        return self.edges[index](h, weights[index])

    def forward(
        self,
        x: Tensor,
        labels: Tensor,
        up_weights: Tensor | None = None,
        op_weights: Tensor | None = None,
    ) -> Tensor:
        if up_weights is None:
            assert self.choice is not None
            s0 = _upsample(x, self.choice.upsample)
        else:
            s0 = up_weights[0] * _upsample(x, UPSAMPLES[0])
            for w, mode in zip(up_weights[1:], UPSAMPLES[1:], strict=True):
                s0 = s0 + w * _upsample(x, mode)
        n1 = self._edge(0, s0, labels, op_weights)
        n2 = self._edge(1, s0, labels, op_weights) + self._edge(2, n1, labels, op_weights)
        return s0 + n2


class SearchedGenerator(ConditionalGenerator):
    """The AutoReCon generator: the supernet (``genotype=None``) or a derived generator.

    Args:
        num_classes, image_size, channels, latent_dim: as :class:`ConditionalGenerator`.
        genotype: a derived architecture, or None for the supernet, whose ``alphas_ops``
            (cells x edges x candidates) and ``alphas_upsample`` (cells x 2) start near zero
            (DARTS: 1e-3 times a standard normal).
        primitives: the supernet's candidates (default: all of :data:`GENERATOR_OPS`).
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        channels: int = 3,
        latent_dim: int = LATENT_DIM,
        genotype: GeneratorGenotype | None = None,
        primitives: Sequence[str] = GENERATOR_OPS,
    ) -> None:
        super().__init__(num_classes, image_size, channels, latent_dim)
        self.genotype = genotype
        self.primitives = tuple(primitives)
        self.init_size = max(1, -(-image_size // 2**CELLS))
        self.label_embedding = nn.Embedding(num_classes, latent_dim)
        self.project = nn.Linear(latent_dim, WIDTH * self.init_size**2)
        choices: Sequence[CellChoice | None] = genotype.cells if genotype else [None] * CELLS
        self.cells = nn.ModuleList(_Cell(num_classes, c, self.primitives) for c in choices)
        self.tail_norm = ConditionalBatchNorm2d(WIDTH, num_classes)
        self.to_image = nn.Conv2d(WIDTH, channels, 3, padding=1)
        self.out_norm = nn.BatchNorm2d(channels, affine=False)
        if genotype is None:
            self.alphas_ops = nn.Parameter(1e-3 * torch.randn(CELLS, EDGES, len(self.primitives)))
            self.alphas_upsample = nn.Parameter(1e-3 * torch.randn(CELLS, len(UPSAMPLES)))

    @property
    def searching(self) -> bool:
        return self.genotype is None

    def arch_parameters(self) -> list[nn.Parameter]:
        """The alphas (empty for a derived generator)."""
        return [self.alphas_ops, self.alphas_upsample] if self.searching else []

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        h = self.project(self.label_embedding(labels) * z)
        h = h.view(len(z), WIDTH, self.init_size, self.init_size)
        if self.searching:
            ops = torch.softmax(self.alphas_ops, dim=-1)
            ups = torch.softmax(self.alphas_upsample, dim=-1)
            for index, cell in enumerate(self.cells):
                h = cell(h, labels, ups[index], ops[index])
        else:
            for cell in self.cells:
                h = cell(h, labels)
        h = self.to_image(F.relu(self.tail_norm(h, labels)))
        return self.out_norm(torch.tanh(self.fit_size(h)))

    def derive(self) -> GeneratorGenotype:
        """The genotype: per edge its strongest op other than ``none``, per cell its upsampling."""
        if not self.searching:
            assert self.genotype is not None
            return self.genotype
        weights = torch.softmax(self.alphas_ops.detach(), dim=-1)
        allowed = [i for i, name in enumerate(self.primitives) if name != "none"]
        cells = []
        for index in range(CELLS):
            edges = []
            for edge in range(EDGES):
                row = weights[index, edge]
                best = max(allowed, key=lambda i: float(row[i]))  # noqa: B023 (used at once)
                edges.append(self.primitives[best])
            up = int(self.alphas_upsample.detach()[index].argmax())
            cells.append(CellChoice(UPSAMPLES[up], tuple(edges)))
        return GeneratorGenotype(tuple(cells))

    def mean_weights(self) -> dict[str, list[float]]:
        """Per cell, each candidate's softmax weight averaged over the cell's edges (for plots)."""
        weights = torch.softmax(self.alphas_ops.detach().float(), dim=-1).mean(dim=1)
        return {f"cell{i + 1}": [float(w) for w in weights[i]] for i in range(CELLS)}
