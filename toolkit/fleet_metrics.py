"""The fleet's learning curves: every device's accuracy per round, the fleet mean, a plot.

Each learning agent keeps, for this process, one entry per round it finished (round, accuracy
on its local test split, train loss, whether it merged a peer's model, when), plus one entry
for the starting point of each run (the accuracy before training, ``train_loss`` None); the
``metrics`` command returns them (see :class:`edge_agent.protocol.Command`).
:func:`collect_metrics` asks every device at once and averages them per round;
:func:`plot_metrics` draws them::

    from toolkit.fleet import FleetClient
    from toolkit.fleet_metrics import collect_metrics, plot_metrics
    from toolkit.fleet_targets import pick_devices

    with FleetClient("mqtt://127.0.0.1:1883", fleet="lab", key_file="fleet.key") as client:
        metrics = collect_metrics(client, pick_devices(client, everyone=True))
    metrics["mean"]          # [{"round": 0, "accuracy": 0.11, "devices": 3}, ...]
    plot_metrics(metrics, "fleet.png")

:func:`wait_for_runs` waits until the devices' learning runs have ended (``learn start
--rounds N --wait``). Which devices a command goes to, and sending it to many, is
:mod:`toolkit.fleet_targets`.

Torch-free; matplotlib is imported by :func:`plot_metrics` alone (it comes with the ``train``
extra).
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitfleet.errors import require
from bitfleet.fsutil import atomic_write_bytes
from edge_agent.protocol import Command
from toolkit.fleet import FleetError
from toolkit.fleet_targets import send_all

if TYPE_CHECKING:
    from toolkit.fleet import FleetClient

__all__ = ["collect_metrics", "draw_metrics", "mean_by_round", "plot_metrics", "wait_for_runs"]


# ------------------------------------------------------------------------------- metrics
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _entry(raw: Any) -> dict[str, Any] | None:
    """One round of a ``metrics`` reply with exactly the keys of the contract (None: unusable)."""
    if not isinstance(raw, Mapping):
        return None
    round_ = raw.get("round")
    if isinstance(round_, bool) or not isinstance(round_, int):
        return None
    merged = raw.get("merged")
    return {
        "round": round_,
        "accuracy": _number(raw.get("accuracy")),
        "train_loss": _number(raw.get("train_loss")),
        "merged": bool(merged) if isinstance(merged, bool | int | float) else None,
        "ts": _number(raw.get("ts")),
    }


def collect_metrics(
    client: FleetClient, devices: Iterable[str], timeout: float = 10.0
) -> dict[str, Any]:
    """Ask each device for its learning rounds (the ``metrics`` command), all at once.

    Returns ``{"devices": {id: [{"round", "accuracy", "train_loss", "merged", "ts"}, ...]},
    "mean": mean_by_round(devices), "errors": {id: message}, "learning": {id: status}}``:
    rounds oldest first as the device keeps them, the fleet mean per round, the devices that
    failed or did not answer within ``timeout``, and each answering device's learning status
    (on, round, accuracy, merges, error: what its telemetry says).
    """
    results, errors = send_all(client, devices, Command.METRICS, timeout=timeout)
    per_device: dict[str, list[dict[str, Any]]] = {}
    learning: dict[str, Any] = {}
    for device, result in sorted(results.items()):
        rounds = result.get("rounds") if isinstance(result, Mapping) else None
        if not isinstance(rounds, list):
            errors[device] = "its metrics reply holds no list of rounds (is its agent older?)"
            continue
        per_device[device] = [e for e in map(_entry, rounds) if e is not None]
        status = result.get("learning")
        learning[device] = dict(status) if isinstance(status, Mapping) else None
    return {
        "devices": per_device,
        "mean": mean_by_round(per_device),
        "errors": dict(sorted(errors.items())),
        "learning": learning,
    }


def wait_for_runs(
    client: FleetClient,
    devices: Iterable[str],
    *,
    timeout: float | None = None,
    poll_s: float = 1.0,
    on_poll: Callable[[dict[str, dict[str, Any]]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Until every device's learning run has ended; each device's final learning status.

    Polls the ``metrics`` command every ``poll_s`` seconds and hands each device's learning
    status (``on``, ``round``, ``accuracy``, ``error``: what its telemetry says) to
    ``on_poll``, for a progress bar. A run ends when it reaches its rounds, stops on an error
    (the status's ``error`` says which) or is stopped. A run without a round limit ends only
    with ``learn stop``. Raises :class:`~toolkit.fleet.FleetError` when a device does not
    answer (gone offline, say) or the runs have not all ended within ``timeout`` seconds.
    """
    waiting = list(dict.fromkeys(devices))
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        results, errors = send_all(client, waiting, Command.METRICS, timeout=max(poll_s, 10.0))
        if errors:
            device, why = sorted(errors.items())[0]
            raise FleetError(f"lost {device} while waiting for its learning run to end: {why}")
        statuses = {
            d: dict(r.get("learning") or {}) if isinstance(r, Mapping) else {}
            for d, r in results.items()
        }
        if on_poll is not None:
            on_poll(statuses)
        running = sorted(d for d, status in statuses.items() if status.get("on"))
        if not running:
            return statuses
        if deadline is not None and time.monotonic() > deadline:
            raise FleetError(
                f"learning still runs on {', '.join(running)} after {timeout:g} s; "
                "bitfleet fleet metrics shows where it got to, learn stop ends it"
            )
        time.sleep(poll_s)


def _latest_per_round(entries: Iterable[Mapping[str, Any]]) -> dict[int, float]:
    """Round -> accuracy, the latest entry winning (a restarted run reports its start again)."""
    out: dict[int, float] = {}
    for entry in entries:
        accuracy = _number(entry.get("accuracy"))
        round_ = entry.get("round")
        if accuracy is not None and isinstance(round_, int) and not isinstance(round_, bool):
            out[round_] = accuracy
    return out


def mean_by_round(per_device: Mapping[str, Iterable[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The fleet's mean accuracy per round, over the devices that reported that round.

    A device that has finished fewer rounds counts in the rounds it reported and in no later
    one (its missing rounds are not filled in), so ``devices`` says how many devices each mean
    averages. Where a device reported a round twice (a run stopped and started again reports
    its starting round anew), its latest entry counts. Entries without a finite accuracy are
    left out. Rounds ascend.
    """
    sums: dict[int, list[float]] = {}
    for entries in per_device.values():
        for round_, accuracy in _latest_per_round(entries).items():
            sums.setdefault(round_, []).append(accuracy)
    return [
        {"round": r, "accuracy": sum(values) / len(values), "devices": len(values)}
        for r, values in sorted(sums.items())
    ]


def _curves(metrics: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Device -> its (round, accuracy) points, a repeated round's latest entry winning."""
    per_device: Mapping[str, Any] = metrics.get("devices") or {}
    curves = {d: sorted(_latest_per_round(e).items()) for d, e in sorted(per_device.items())}
    return {d: points for d, points in curves.items() if points}


def draw_metrics(axes: Any, metrics: Mapping[str, Any], title: str | None = None) -> int:
    """Draw ``metrics`` on a matplotlib ``axes``: a thin line per device, a thick fleet mean.

    The drawing of :func:`plot_metrics`, for a figure of several panels (one per run, say).
    ``metrics`` is what :func:`collect_metrics` returns (its ``mean`` is recomputed when
    absent). Returns how many devices have a curve (0: only the empty axes are drawn).
    """
    curves = _curves(metrics)
    mean = metrics.get("mean")
    if not isinstance(mean, list):
        mean = mean_by_round(metrics.get("devices") or {})
    for device, points in curves.items():
        rounds, accuracies = zip(*points, strict=True)
        axes.plot(rounds, accuracies, linewidth=1, alpha=0.7, label=device)
    if mean:
        axes.plot(
            [m["round"] for m in mean],
            [m["accuracy"] for m in mean],
            linewidth=3,
            color="black",
            label="fleet mean",
        )
    axes.set(xlabel="round", ylabel="accuracy on local test data", ylim=(0, 1))
    axes.set_title(title or f"fleet accuracy over rounds ({len(curves)} devices)")
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(fontsize="small", ncol=1 + len(curves) // 12)
    return len(curves)


def plot_metrics(
    metrics: Mapping[str, Any], path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Accuracy over rounds as a PNG: a thin line per device, a thick one for the fleet mean.

    ``metrics`` is what :func:`collect_metrics` returns (its ``mean`` is recomputed when
    absent); :func:`draw_metrics` draws it. The file is written atomically (a temporary
    sibling renamed over ``path``). Raises ValueError when no device has reported a round with
    an accuracy, and for a ``path`` that is a folder.
    """
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{target} is a folder; name the PNG file to write, e.g. fleet.png")
    if not _curves(metrics):
        raise ValueError(
            "nothing to plot: no device has reported a learning round yet "
            "(start learning with bitfleet fleet learn start)"
        )
    require("matplotlib", "train", "plotting the fleet's metrics")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # a Figure with its own Agg canvas: no pyplot, so no global backend or figure registry
    figure = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(figure)
    draw_metrics(figure.add_subplot(), metrics, title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(target, buffer.getvalue())
    return target
