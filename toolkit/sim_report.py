"""Run and report simulations: several methods on one setup, in parallel, with plots.

``compare`` runs each method as its own process (two at a time on a 2-core machine, each with
one torch thread: LeNet-sized models do not scale across threads, whole simulations do) and
reports, per method, the final mean accuracy and the rounds needed to reach the target
accuracy: by default 90% of FedAvg's final mean accuracy on the same setup.
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

__all__ = ["COMPARED", "compare", "summarise", "plot", "write_results"]

COMPARED = ("vc", "avg", "fedavg")
"""The methods ``bitfleet simulate --compare`` runs."""


def _run(config: SimulationConfig, events: Any) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)

    def report(round_index: int, record: dict[str, Any]) -> None:
        if events is not None:
            events.put((config.merge, round_index))

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
    """Run ``config`` once per method (in parallel processes); results by method."""
    workers = workers or min(len(methods), os.cpu_count() or 1)
    configs = {m: replace(config, merge=m) for m in methods}
    results: dict[str, SimulationResult] = {}
    if workers <= 1:
        for method, cfg in configs.items():
            progress = partial(_report_round, on_round, method) if on_round else None
            results[method] = simulate(cfg, progress=progress)
        return results
    with Manager() as manager, ProcessPoolExecutor(max_workers=workers) as pool:
        events = manager.Queue()
        futures = {m: pool.submit(_run, cfg, events) for m, cfg in configs.items()}
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
    """The ``--json`` document: target accuracy and, per method, final accuracy and rounds."""
    if target is None and "fedavg" in results:
        target = 0.9 * results["fedavg"].final_accuracy
    methods = {}
    for method, result in results.items():
        last = result.history[-1]
        methods[method] = {
            "final_accuracy": result.final_accuracy,
            "final_min_accuracy": last["min_accuracy"],
            "final_max_accuracy": last["max_accuracy"],
            "rounds_to_target": result.rounds_to(target) if target is not None else None,
            "rounds": last["round"],
            "bytes_sent": last["bytes_sent"],
        }
    return {"target_accuracy": target, "methods": methods}


def plot(
    results: dict[str, SimulationResult], path: str | os.PathLike[str], target: float | None
) -> None:
    """Accuracy vs round and mean weight variance vs round, one line per method, as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, var_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for method, result in results.items():
        rounds = [r["round"] for r in result.history]
        acc_ax.plot(rounds, [r["mean_accuracy"] for r in result.history], label=method)
        variances = [
            sum(r["variance"].values()) / max(len(r["variance"]), 1) for r in result.history
        ]
        var_ax.plot(rounds, variances, label=method)
    if target is not None:
        acc_ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
    acc_ax.set(xlabel="round", ylabel="mean test accuracy across nodes", ylim=(0, 1))
    var_ax.set(xlabel="round", ylabel="mean weight variance (per tensor)", yscale="log")
    for ax in (acc_ax, var_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    config = next(iter(results.values())).config
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
    plot(results, root / "curves.png", summary.get("target_accuracy"))
