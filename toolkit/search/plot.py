"""``alphas.png``: how the architecture weights moved over the search, one panel per cell type.

Each panel draws, per candidate operation, its softmax weight averaged over the cell's edges at
every epoch (epoch 0: the initial alphas). A search that works shows the lines parting; one
where every line stays at ``1 / candidates`` learned nothing about the architecture (too few
steps, or an architecture learning rate too small for them).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from bitfleet.errors import require
from bitfleet.fsutil import atomic_write_bytes

__all__ = ["mean_weights", "plot_alphas"]

CELL_TITLES = {"normal": "normal cell", "reduce": "reduction cell"}


def mean_weights(alphas: Tensor) -> list[float]:
    """Each candidate's softmax weight averaged over a cell's edges (one number per column)."""
    return [float(w) for w in torch.softmax(alphas.detach().float(), dim=-1).mean(dim=0)]


def plot_alphas(
    history: Sequence[Mapping[str, Sequence[float]]],
    primitives: Sequence[str],
    path: str | os.PathLike[str],
    panels: Mapping[str, str] = CELL_TITLES,
) -> Path:
    """Draw the architecture weights over the epochs as a PNG at ``path`` (atomically).

    ``history`` holds, per epoch, one list of :func:`mean_weights` per key of ``panels``
    (``{"normal": [...], "reduce": [...]}`` for the cell search); each key gets a panel titled
    with its value.
    """
    if not history:
        raise ValueError("no architecture weights to plot: the search has not run an epoch")
    require("matplotlib", "train", "plotting the architecture weights")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(figure)
    epochs = list(range(len(history)))
    axes_list = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for axes, (kind, title) in zip(axes_list, panels.items(), strict=True):
        for column, name in enumerate(primitives):
            axes.plot(epochs, [entry[kind][column] for entry in history], marker=".", label=name)
        axes.axhline(1 / len(primitives), color="grey", linewidth=0.8, linestyle=":")
        axes.set(xlabel="epoch", title=title)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    axes_list[0].set_ylabel("mean softmax weight over edges")
    axes_list[-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    target = Path(path)
    atomic_write_bytes(target, buffer.getvalue())
    return target
