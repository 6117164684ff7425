"""`bitfleet demo`: a real broker, real agent processes, a rollout and gossip learning.

The end-to-end test runs the whole demo small (3 nodes, 3 rounds); the others stop it half-way
(a failing rollout, Ctrl-C) and check that every process it started is gone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from fleet_cli_support import broken_help_lines
from PIL import Image
from typer.testing import CliRunner

from toolkit.cli import app


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _demo(*args: str):
    return CliRunner().invoke(app, ["demo", *args])


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.slow
def test_demo_learns_reports_and_leaves_no_process(tmp_path):
    before = _children()
    out = tmp_path / "demo"
    result = _demo("--nodes", "3", "--rounds", "3", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout holds the JSON document alone

    assert (report["nodes"], report["rounds"]) == (3, 3)
    start, end = report["accuracy"]["start"], report["accuracy"]["end"]
    assert 0.0 < start < 1.0 and end >= start, report["accuracy"]
    # the fleet starts from the deployed seed model: round 0 is its test accuracy
    assert start == pytest.approx(report["seed_model"]["accuracy"])
    assert [d["id"] for d in report["devices"]] == ["node-01", "node-02", "node-03"]
    assert all(d["round"] == 3 and 0.0 <= d["accuracy"] <= 1.0 for d in report["devices"])
    assert np.mean([d["accuracy"] for d in report["devices"]]) == pytest.approx(end)
    mean = report["runs"]["vc"]["metrics"]["mean"]
    assert [m["round"] for m in mean] == [0, 1, 2, 3]
    assert report["runs"]["vc"]["rollout"]["ok"]
    assert {d["outcome"] for d in report["runs"]["vc"]["rollout"]["devices"]} == {"deployed"}

    assert Path(report["report"]) == out / "report.json"
    assert json.loads((out / "report.json").read_text())["accuracy"] == report["accuracy"]
    with Image.open(report["plot"]) as image:
        assert image.format == "PNG" and image.size[0] > 300
    # progress went to stderr
    assert "all 3 agents online" in result.stderr

    roles = sorted(p["role"] for p in report["processes"])
    assert roles == ["agent", "agent", "agent", "broker"]
    assert all(_gone(p["pid"]) for p in report["processes"])
    assert _children() <= before


def _failing_rollout(monkeypatch, error: BaseException) -> dict[str, set[int]]:
    """Make the rollout fail with ``error``, noting which processes ran at that moment."""
    seen: dict[str, set[int]] = {}

    def rollout(client, artifact, targets, **kwargs):
        seen["running"] = _children()
        raise error

    monkeypatch.setattr("toolkit.rollout.rollout", rollout)
    return seen


@pytest.mark.slow
def test_an_error_half_way_is_one_line_and_stops_every_process(tmp_path, monkeypatch):
    from toolkit.rollout import RolloutError

    before = _children()
    seen = _failing_rollout(monkeypatch, RolloutError("no target online"))
    result = _demo("--nodes", "2", "--rounds", "1", "--out", str(tmp_path / "d"), "--json")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "error: no target online"  # after the progress lines, one error line
    assert sum(line.startswith("error") for line in lines) == 1
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert len(seen["running"] - before) == 3  # the broker and two agents were up then
    assert _children() <= before
    assert all(_gone(pid) for pid in seen["running"] - before)


@pytest.mark.slow
def test_ctrl_c_half_way_stops_every_process(tmp_path, monkeypatch):
    before = _children()
    seen = _failing_rollout(monkeypatch, KeyboardInterrupt())
    result = _demo("--nodes", "2", "--rounds", "1", "--out", str(tmp_path / "d"))
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr
    assert len(seen["running"] - before) == 3
    assert _children() <= before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--nodes", "0"], "--nodes must be between 2 and 16"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--model", "lenet9"], "unknown model 'lenet9'"),
    ],
)
def test_bad_input_is_one_line_and_starts_nothing(tmp_path, args, expected):
    before = _children()
    out = tmp_path / "d"
    result = _demo(*args, "--out", str(out))
    assert result.exit_code == 1, result.output
    line = _one_line(result.stderr)
    assert line.startswith("error: ") and expected in line, line
    assert not out.exists()  # nothing half-done
    assert _children() <= before


def test_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    result = _demo("--out", str(out))
    assert result.exit_code == 1
    assert "is a file" in _one_line(result.stderr)


def test_the_seed_model_is_reused_only_when_it_matches(tmp_path):
    from toolkit.data import load_dataset
    from toolkit.demo import DemoConfig, _seed_model, _split

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    config = DemoConfig(nodes=2, out=tmp_path, seed_images=100, seed_epochs=1)
    seed_idx, rest = _split(config, train)
    assert len(seed_idx) == 100 and len(set(seed_idx) | set(rest)) == len(train)

    first = _seed_model(config, train, test, seed_idx, show=False)
    assert not first.reused and 0.0 <= first.accuracy <= 1.0
    manifest = json.loads((first.artifact / "manifest.json").read_text())
    assert manifest["spec"]["name"] == "lenet5"  # on-device learning needs the spec
    assert manifest["format"] == "onnx-portable"

    again = _seed_model(config, train, test, seed_idx, show=False)
    assert again.reused and again.accuracy == first.accuracy

    other = DemoConfig(nodes=2, out=tmp_path, seed_images=120, seed_epochs=1)
    changed = _seed_model(other, train, test, _split(other, train)[0], show=False)
    assert not changed.reused


@pytest.mark.slow
def test_sigint_while_the_fleet_learns_stops_every_process(tmp_path):
    """Ctrl-C in a terminal: SIGINT to the demo alone (its agents run in their own sessions)."""
    import signal
    import subprocess
    import time

    # -X faulthandler: if it hangs, SIGABRT makes it print every thread's stack
    command = [sys.executable, "-X", "faulthandler", "-m", "toolkit.cli", "demo", "--nodes", "2"]
    proc = subprocess.Popen(
        [*command, "--rounds", "500", "--out", str(tmp_path / "d"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a suite started in the background (`cmd &` in a script) ignores
        # SIGINT, which every child inherits across exec, and Python then installs no
        # KeyboardInterrupt handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:  # progress lines, one per step
            if "learning 500 rounds" in line or time.monotonic() > deadline:
                break
        started = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert len(started) == 3, started  # the broker and two learning agents
        # Python installs its KeyboardInterrupt handler only if SIGINT was not ignored when it
        # started
        status = dict(line.split(":\t", 1) for line in open(f"/proc/{proc.pid}/status"))
        bit = 1 << (signal.SIGINT - 1)
        assert int(status["SigCgt"], 16) & bit, f"the demo does not catch SIGINT: {status}"
        assert not int(status["SigBlk"], 16) & bit, f"the demo blocks SIGINT: {status}"
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"the demo did not exit within 60 s of SIGINT; its threads:\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert all(_gone(pid) for pid in started)


def test_without_the_embedded_broker_it_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "amqtt", None)  # as if the train extra were left out
    out = tmp_path / "d"
    result = _demo("--out", str(out))
    assert result.exit_code == 1, result.output
    assert "pip install 'bitfleet[train]'" in _one_line(result.stderr)
    assert not out.exists()


def test_the_compare_figure_draws_each_run_as_fleet_metrics_does(tmp_path, monkeypatch):
    """Each panel of ``--compare``'s fleet.png is drawn by toolkit.fleet_metrics.draw_metrics."""
    import toolkit.fleet_metrics as fleet_metrics
    from toolkit.demo import DemoConfig, _plot, _Run

    panels: list[tuple[str, dict[str, list[float]]]] = []
    real = fleet_metrics.draw_metrics

    def spy(axes, metrics, title=None):
        drawn = real(axes, metrics, title)
        panels.append((title, {line.get_label(): list(line.get_ydata()) for line in axes.lines}))
        return drawn

    monkeypatch.setattr(fleet_metrics, "draw_metrics", spy)
    per_device = {
        # pi-00 stopped and started again, so it reported round 1 twice: the latest counts
        "pi-00": [
            {"round": 0, "accuracy": 0.5},
            {"round": 1, "accuracy": 0.1},
            {"round": 1, "accuracy": 0.7},
        ],
        "pi-01": [{"round": 0, "accuracy": 0.4}, {"round": 1, "accuracy": 0.8}],
    }
    runs = [_Run(merge, {"devices": per_device}, {}, 1.0) for merge in ("vc", "avg")]
    config = DemoConfig(nodes=2, rounds=1, compare=True, out=tmp_path)
    path = _plot(runs, tmp_path / "fleet.png", config)
    assert [title for title, _ in panels] == ["vc merging", "avg merging"]
    for _, lines in panels:
        assert lines["pi-00"] == pytest.approx([0.5, 0.7])
        assert lines["pi-01"] == pytest.approx([0.4, 0.8])
        assert lines["fleet mean"] == pytest.approx([0.45, 0.75])
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 2 * image.size[1]  # two panels


def test_the_help_reads_as_paragraphs():
    assert broken_help_lines("demo") == []


@pytest.mark.parametrize("partition", ["dirichlet:1.0", "dirichlet-pool:0.5"])
def test_node_data_is_what_the_agents_read_for_shards_and_pools(tmp_path, partition):
    from safetensors.numpy import load_file

    from edge_agent.learning import LABEL_PROBS
    from toolkit.data import load_dataset
    from toolkit.demo import DemoConfig, _write_node_data

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    config = DemoConfig(nodes=3, out=tmp_path, partition=partition)
    rest = np.arange(300, len(train.y))
    dirs = _write_node_data(config, train, test, rest)
    assert sorted(dirs) == config.device_ids()
    files = [load_file(dirs[device] / "train.safetensors") for device in config.device_ids()]
    if partition.startswith("dirichlet-pool"):
        for data in files:  # the whole split, drawn from with the node's own label odds
            assert np.array_equal(data["y"], train.y[rest])
            assert data[LABEL_PROBS].shape == (10,) and abs(data[LABEL_PROBS].sum() - 1) < 1e-5
        assert not np.allclose(files[0][LABEL_PROBS], files[1][LABEL_PROBS])
    else:  # disjoint shards that cover the split
        assert all(LABEL_PROBS not in data for data in files)
        assert sum(len(data["y"]) for data in files) == len(rest)
    assert load_file(dirs["node-01"] / "test.safetensors")["y"].shape == test.y.shape
