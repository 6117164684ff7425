"""toolkit.sim_report: curve metrics on hand-made curves, the fourth method, the plot."""

from __future__ import annotations

import pytest

from toolkit.sim_report import COMPARED, compare, plot, summarise
from toolkit.simulate import SimulationConfig, SimulationResult

CONFIG = SimulationConfig(nodes=4, topology="ring", rounds=4, local_steps=1)


def curve(*accuracies: float, every: int = 1) -> SimulationResult:
    """A result whose mean accuracy at rounds 0, every, 2 * every, ... is ``accuracies``."""
    history = [
        {
            "round": i * every,
            "steps": i * every,
            "mean_accuracy": a,
            "min_accuracy": a - 0.01,
            "max_accuracy": a + 0.01,
            "bytes_sent": 100 * i,
            "variance": {"w": 1.0},
        }
        for i, a in enumerate(accuracies)
    ]
    return SimulationResult(CONFIG, history)


def test_auc_is_the_trapezoid_area_over_the_rounds():
    # (0 + 0.5) / 2 + (0.5 + 0.8) / 2 + (0.8 + 1) / 2 + (1 + 1) / 2 = 2.8, over 4 rounds
    assert curve(0.0, 0.5, 0.8, 1.0, 1.0).auc == pytest.approx(0.7, rel=1e-12)
    assert curve(0.3, 0.3, 0.3).auc == pytest.approx(0.3, rel=1e-12)
    # evaluated every 5 rounds: the same area per round
    assert curve(0.0, 0.5, 0.8, 1.0, 1.0, every=5).auc == pytest.approx(0.7, rel=1e-12)
    assert curve(0.0, 1.0).auc == pytest.approx(0.5)


def test_rounds_to_fractions_of_fedavgs_final_accuracy():
    results = {
        "fedavg": curve(0.1, 0.5, 0.8, 1.0, 1.0),
        "vc": curve(0.1, 0.2, 0.6, 0.85, 0.92),
        "avg": curve(0.1, 0.1, 0.1, 0.1, 0.45),
    }
    doc = summarise(results)
    assert doc["reference_accuracy"] == 1.0 and doc["reference"] == "fedavg"
    assert doc["target_accuracy"] == pytest.approx(0.9)
    fedavg, vc, avg = (doc["methods"][m] for m in ("fedavg", "vc", "avg"))
    assert fedavg["rounds_to"] == {"0.5": 1, "0.8": 2, "0.9": 3, "0.95": 3}
    assert vc["rounds_to"] == {"0.5": 2, "0.8": 3, "0.9": 4, "0.95": None}
    assert avg["rounds_to"] == {"0.5": None, "0.8": None, "0.9": None, "0.95": None}
    assert vc["rounds_to_target"] == vc["rounds_to"]["0.9"] == 4  # the 90% stays
    # round 0 (the initial models) never counts as reaching anything
    early = summarise({"fedavg": curve(0.9, 0.05, 0.2)})["methods"]["fedavg"]["rounds_to"]
    assert early == {"0.5": 2, "0.8": 2, "0.9": 2, "0.95": 2}
    assert vc["auc"] == pytest.approx((0.3 + 0.8 + 1.45 + 1.77) / 2 / 4, rel=1e-12)
    assert (vc["rounds"], vc["steps"], vc["bytes_sent"]) == (4, 4, 400)


def test_reference_without_fedavg():
    vc = curve(0.1, 0.2, 0.6, 0.85, 0.92)
    doc = summarise({"vc": vc}, target=0.81)
    assert doc["reference"] == "target" and doc["reference_accuracy"] == pytest.approx(0.9)
    row = doc["methods"]["vc"]
    assert row["rounds_to"] == {"0.5": 2, "0.8": 3, "0.9": 3, "0.95": 4}
    assert row["rounds_to"]["0.9"] == row["rounds_to_target"] == 3
    # an explicit target with FedAvg present: the fractions stay FedAvg's
    doc = summarise({"vc": vc, "fedavg": curve(0.1, 0.5, 0.8, 1.0, 1.0)}, target=0.5)
    assert doc["reference"] == "fedavg" and doc["target_accuracy"] == 0.5
    assert doc["methods"]["vc"]["rounds_to_target"] == 2
    assert doc["methods"]["vc"]["rounds_to"]["0.9"] == 4
    # neither: no reference, nothing reached, the AUC still there
    doc = summarise({"vc": vc})
    assert doc["reference_accuracy"] is None and doc["target_accuracy"] is None
    assert set(doc["methods"]["vc"]["rounds_to"].values()) == {None}
    assert doc["methods"]["vc"]["auc"] == pytest.approx(vc.auc)


def test_plot_with_reference_marks(tmp_path):
    results = {"fedavg": curve(0.1, 0.5, 0.8, 1.0, 1.0), "vc": curve(0.1, 0.2, 0.6, 0.85, 0.92)}
    plot(results, tmp_path / "curves.png", 0.9, 1.0)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_runs_avg_common_from_a_common_start():
    assert COMPARED == ("vc", "avg", "avg_common", "fedavg")
    config = SimulationConfig(nodes=3, topology="full", rounds=1, local_steps=1, batch_size=8)
    results = compare(config, ("avg", "avg_common"), workers=1)
    assert results["avg_common"].config.init == "common"
    assert results["avg_common"].config.merge == "avg"
    assert results["avg"].config.init == "independent"
    # a common start: every node's initial model is the same, so they score the same
    start = results["avg_common"].history[0]
    assert start["min_accuracy"] == start["max_accuracy"]
    with pytest.raises(ValueError, match="unknown method 'median'"):
        compare(config, ("vc", "median"), workers=1)
