"""Run and report simulations: several methods on one setup, in parallel, with plots.

``compare`` runs each method as its own process (two at a time on a 2-core machine, each with
one torch thread: LeNet-sized models do not scale across threads, whole simulations do) and
:func:`summarise` reports, per method:

- the final mean accuracy across nodes (and its min and max);
- ``rounds_to_target``: the first round whose mean accuracy reaches the target, by default 90%
  of FedAvg's final mean accuracy on the same setup;
- ``rounds_to``: the same for 50, 80, 90 and 95% of a reference accuracy, keyed ``"0.5"``,
  ``"0.8"``, ``"0.9"``, ``"0.95"``. The reference is FedAvg's final mean accuracy when FedAvg
  ran; otherwise, with an explicit target, ``target / 0.9`` (so ``rounds_to["0.9"]`` is
  ``rounds_to_target``); otherwise there is none and every entry is None, as
  ``rounds_to_target`` is;
- ``auc``: the area under the mean-accuracy curve divided by the number of rounds, in [0, 1]
  (:attr:`toolkit.simulate.SimulationResult.auc`);
- ``steps``: SGD steps per node (rounds x local steps), the axis every method shares.

Methods are the simulator's merge methods (``vc``, ``avg``, ``fedavg``) and ``avg_common``:
plain gossip averaging from a common initialisation, the FL-like start that isolates what the
independent start costs.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from multiprocessing import Manager
from pathlib import Path
from typing import Any

from bitfleet.fsutil import atomic_write_bytes, atomic_write_json

from .simulate import SimulationConfig, SimulationResult, simulate

__all__ = [
    "COMPARED",
    "FRACTIONS",
    "METHOD_SETTINGS",
    "compare",
    "summarise",
    "plot",
    "write_results",
]

METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "vc": {"merge": "vc"},
    "avg": {"merge": "avg"},
    "avg_common": {"merge": "avg", "init": "common"},
    "fedavg": {"merge": "fedavg"},
}
"""What each method name sets in the shared :class:`SimulationConfig`."""

COMPARED = ("vc", "avg", "avg_common", "fedavg")
"""The methods ``bitfleet simulate --compare`` runs."""

FRACTIONS = (0.5, 0.8, 0.9, 0.95)
"""Fractions of the reference accuracy reported in ``rounds_to``."""


def _run(method: str, config: SimulationConfig, events: Any) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)

    def report(round_index: int, record: dict[str, Any]) -> None:
        if events is not None:
            events.put((method, round_index))

    return simulate(config, progress=report).to_dict()


def _report_round(on_round: Any, method: str, round_index: int, record: dict[str, Any]) -> None:
    on_round(method, round_index)


def compare(
    config: SimulationConfig,
    methods: tuple[str, ...],
    *,
    workers: int | None = None,
    on_round: Any = None,
) -> dict[str, SimulationResult]:
    """Run ``config`` once per method (in parallel processes); results by method.

    ``methods`` are names of :data:`METHOD_SETTINGS`; each run is ``config`` with that method's
    settings. Raises ValueError for an unknown name, before anything runs.
    """
    unknown = [m for m in methods if m not in METHOD_SETTINGS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; use one of {', '.join(METHOD_SETTINGS)}")
    workers = workers or min(len(methods), os.cpu_count() or 1)
    configs = {m: replace(config, **METHOD_SETTINGS[m]) for m in methods}
    results: dict[str, SimulationResult] = {}
    if workers <= 1:
        for method, cfg in configs.items():
            progress = partial(_report_round, on_round, method) if on_round else None
            results[method] = simulate(cfg, progress=progress)
        return results
    with Manager() as manager, ProcessPoolExecutor(max_workers=workers) as pool:
        events = manager.Queue()
        futures = {m: pool.submit(_run, m, cfg, events) for m, cfg in configs.items()}
        while not all(f.done() for f in futures.values()):
            try:
                method, round_index = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if on_round is not None:
                on_round(method, round_index)
        for method, future in futures.items():
            data = future.result()
            results[method] = SimulationResult(configs[method], data["history"])
    return results


def summarise(results: dict[str, SimulationResult], target: float | None = None) -> dict[str, Any]:
    """The ``--json`` document: target and reference accuracy, and per method its metrics.

    See the module doc for what each key means and where the reference comes from.
    """
    reference: float | None = None
    source: str | None = None
    if "fedavg" in results:
        reference, source = results["fedavg"].final_accuracy, "fedavg"
    elif target is not None:
        reference, source = target / 0.9, "target"
    if target is None and reference is not None:
        target = 0.9 * reference
    methods = {}
    for method, result in results.items():
        last = result.history[-1]
        methods[method] = {
            "final_accuracy": result.final_accuracy,
            "final_min_accuracy": last["min_accuracy"],
            "final_max_accuracy": last["max_accuracy"],
            "rounds_to_target": result.rounds_to(target) if target is not None else None,
            "rounds_to": {
                f"{f:g}": result.rounds_to(f * reference) if reference is not None else None
                for f in FRACTIONS
            },
            "auc": result.auc,
            "rounds": last["round"],
            "steps": last.get("steps"),
            "bytes_sent": last["bytes_sent"],
        }
    return {
        "target_accuracy": target,
        "reference_accuracy": reference,
        "reference": source,
        "methods": methods,
    }


def plot(
    results: dict[str, SimulationResult],
    path: str | os.PathLike[str],
    target: float | None,
    reference: float | None = None,
) -> None:
    """Accuracy vs round and mean weight variance vs round, one line per method, as a PNG.

    The accuracy legend gives each method's AUC; with a ``reference`` accuracy, dotted lines
    mark its 50 / 80 / 90 / 95% and a dot marks where each method first reaches each of them.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, var_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for method, result in results.items():
        rounds = [r["round"] for r in result.history]
        (line,) = acc_ax.plot(
            rounds,
            [r["mean_accuracy"] for r in result.history],
            label=f"{method} (AUC {result.auc:.3f})",
        )
        if reference is not None:
            reached = [(result.rounds_to(f * reference), f * reference) for f in FRACTIONS]
            points = [(x, y) for x, y in reached if x is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                acc_ax.scatter(xs, ys, color=line.get_color(), s=14, zorder=3)
        variances = [
            sum(r["variance"].values()) / max(len(r["variance"]), 1) for r in result.history
        ]
        var_ax.plot(rounds, variances, label=method)
    if target is not None:
        acc_ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
    if reference is not None:
        for fraction in FRACTIONS:
            acc_ax.axhline(fraction * reference, color="grey", linestyle=":", linewidth=0.7)
    config = next(iter(results.values())).config
    steps = config.local_steps
    xlabel = f"round ({steps} local SGD step{'s' if steps > 1 else ''} per node each)"
    acc_ax.set(xlabel=xlabel, ylabel="mean test accuracy across nodes", ylim=(0, 1))
    var_ax.set(xlabel=xlabel, ylabel="mean weight variance (per tensor)", yscale="log")
    for ax in (acc_ax, var_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"{config.model}, {config.nodes} nodes, {config.topology}, {config.data}, "
        f"init {config.init}, seed {config.seed}"
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def write_results(
    out: str | os.PathLike[str], results: dict[str, SimulationResult], summary: dict[str, Any]
) -> None:
    """Per-method histories, the summary and the plot, each written atomically."""
    root = Path(out)
    for method, result in results.items():
        atomic_write_json(root / f"{method}.json", result.to_dict())
    atomic_write_json(root / "summary.json", summary)
    plot(
        results,
        root / "curves.png",
        summary.get("target_accuracy"),
        summary.get("reference_accuracy"),
    )
