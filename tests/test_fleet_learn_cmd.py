"""`bitfleet fleet learn start|stop` and `bitfleet fleet metrics` against in-process agents.

Three agents learn from small non-IID shards of the bundled digits on a real broker; the CLI
starts and stops them, and the fleet mean accuracy it reports must rise. The pure parts of
:mod:`toolkit.fleet_metrics` (the per-round mean, the plot) are checked on hand-made numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from agent_support import agent_config, ghost
from fleet_cli_support import flags, fleet_cli, one_line
from safetensors.numpy import save_file

from edge_agent.broker import free_port
from edge_agent.config import LearnSettings
from toolkit.cli.fleet_learn_cmd import metrics_table, shown_rounds
from toolkit.data import load_dataset
from toolkit.fleet_metrics import draw_metrics, mean_by_round, plot_metrics
from toolkit.partition import partition

IDS = ("pi-00", "pi-01", "pi-02")

pytestmark = pytest.mark.usefixtures("no_user_settings")


# ------------------------------------------------------------------------------ the mean
def test_mean_by_round_averages_the_devices_that_reported_each_round():
    per_device = {
        "a": [{"round": 0, "accuracy": 0.1}, {"round": 1, "accuracy": 0.5}],
        "b": [
            {"round": 0, "accuracy": 0.3},
            {"round": 1, "accuracy": 0.7},
            {"round": 2, "accuracy": 0.9},
        ],
        # a run stopped at round 1 and started again: its new starting point counts
        "c": [
            {"round": 0, "accuracy": 0.2},
            {"round": 1, "accuracy": 0.0},
            {"round": 1, "accuracy": 0.3, "train_loss": None},
            {"round": 2, "accuracy": None},  # no accuracy: left out
        ],
    }
    assert mean_by_round(per_device) == [
        {"round": 0, "accuracy": pytest.approx(0.2), "devices": 3},
        {"round": 1, "accuracy": pytest.approx(0.5), "devices": 3},
        {"round": 2, "accuracy": pytest.approx(0.9), "devices": 1},
    ]
    assert mean_by_round({}) == [] and mean_by_round({"a": []}) == []


def test_the_table_shows_every_kth_round_of_a_long_run_and_always_the_last():
    assert shown_rounds(list(range(5))) == ([0, 1, 2, 3, 4], 1)
    picked, step = shown_rounds(list(range(101)), max_rows=20)
    assert len(picked) <= 20 and picked[0] == 0 and picked[-1] == 100 and step == 6
    picked, step = shown_rounds(list(range(45)), max_rows=20)
    assert len(picked) <= 20 and picked[-1] == 44 and picked[:3] == [0, 3, 6]

    per_device = {d: [{"round": r, "accuracy": r / 100} for r in range(60)] for d in ("a", "b")}
    metrics = {"devices": per_device, "mean": mean_by_round(per_device)}
    table = metrics_table(metrics)
    assert table is not None and table.row_count <= 20
    assert [c.header for c in table.columns] == ["round", "a", "b", "mean"]
    assert "rounds in steps of 4 (of 60" in str(table.caption)
    assert metrics_table({"devices": {"a": []}, "mean": []}) is None
    # a device that never learned gets no column, and the caption names it
    per_device["idle"] = []
    table = metrics_table({"devices": per_device})
    assert table is not None and [c.header for c in table.columns] == ["round", "a", "b", "mean"]
    assert "no rounds yet: idle" in str(table.caption) and "(n)" not in str(table.caption)
    # too many devices for the terminal: the fleet's lowest, mean and highest per round
    many = {f"device-{i:02d}": [{"round": 0, "accuracy": i / 20}] for i in range(20)}
    table = metrics_table({"devices": many}, width=100)
    assert table is not None
    assert [c.header for c in table.columns] == ["round", "lowest", "mean", "highest", "devices"]
    assert [next(iter(c.cells)) for c in table.columns] == ["0", "0.000", "0.475", "0.950", "20"]
    assert "20 devices: too many columns" in str(table.caption)
    assert len(metrics_table({"devices": many}).columns) == 22  # no width: every device


def test_plot_writes_a_png_atomically_and_refuses_nothing_to_plot(tmp_path):
    from PIL import Image

    per_device = {
        "a": [{"round": r, "accuracy": 0.1 + 0.1 * r} for r in range(5)],
        "b": [{"round": r, "accuracy": 0.2 + 0.05 * r} for r in range(3)],
    }
    path = plot_metrics({"devices": per_device}, tmp_path / "out" / "fleet.png", title="t")
    assert path == tmp_path / "out" / "fleet.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert [p.name for p in path.parent.iterdir()] == ["fleet.png"]  # no temp file left
    # what is drawn: a line per device (its latest entry per round) and the thick mean
    from matplotlib.figure import Figure

    axes = Figure().add_subplot()
    again = {"a": [*per_device["a"], {"round": 4, "accuracy": 0.05}], "b": per_device["b"]}
    assert draw_metrics(axes, {"devices": again}) == 2
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert list(lines) == ["a", "b", "fleet mean"]
    assert list(lines["a"].get_ydata()) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.05])
    assert lines["fleet mean"].get_linewidth() > lines["a"].get_linewidth()
    assert list(lines["fleet mean"].get_xdata()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_metrics({"devices": {"a": []}}, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()
    with pytest.raises(ValueError, match="folder"):
        plot_metrics({"devices": per_device}, tmp_path)


# ------------------------------------------------------------------------ a learning fleet
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    """Three small non-IID shards of digits (2 label shards each) and the digits test split."""
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    root = tmp_path_factory.mktemp("shards")
    folders = []
    for node, index in enumerate(partition("shards:2", train.y, len(IDS), seed=0)):
        folder = root / f"data{node}"
        folder.mkdir()
        save_file({"x": train.x[index], "y": train.y[index]}, str(folder / "train.safetensors"))
        keep = np.arange(0, len(test.y), 3)  # 150 test images: evaluation stays quick
        save_file({"x": test.x[keep], "y": test.y[keep]}, str(folder / "test.safetensors"))
        folders.append(folder)
    return folders


def _start_fleet(agents, url, key_file, artifact, tmp_path, shards):
    learning = LearnSettings(round_interval_s=0.1, optimizer="adam", lr=0.003)
    started = [
        agents(
            agent_config(
                url,
                key_file,
                tmp_path / f"s{i}",
                id=device,
                artifact=str(artifact),
                data_dir=str(shards[i]),
                learning=learning,
            )
        )
        for i, device in enumerate(IDS)
    ]
    return started


def _wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_learn_start_metrics_plot_and_stop(broker, agents, key_file, artifact, tmp_path, shards):
    fleet_agents = _start_fleet(agents, broker.url, key_file, artifact, tmp_path, shards)
    connection = flags(broker.url, key_file)

    started = fleet_cli(
        "learn",
        "start",
        "--all",
        "--local-steps",
        "8",
        "--merge",
        "avg",
        "--vc-rule",
        "dfl2",
        *connection,
    )
    assert started.exit_code == 0, started.output
    assert all(device in started.stdout for device in IDS) and "local_steps 8" in started.stdout
    assert all(agent.learning for agent in fleet_agents)
    assert all(agent.learner.settings.local_steps == 8 for agent in fleet_agents)
    assert all(agent.learner.settings.merge == "avg" for agent in fleet_agents)
    assert all(agent.learner.settings.vc_rule == "dfl2" for agent in fleet_agents)
    # settings not given stay the device's own
    assert all(agent.learner.settings.peers == LearnSettings().peers for agent in fleet_agents)

    assert _wait_until(lambda: all(a.learner.round >= 6 for a in fleet_agents), 120)
    stopped = fleet_cli("learn", "stop", "--all", "--json", *connection)
    assert stopped.exit_code == 0, stopped.output
    rows = json.loads(stopped.stdout)
    assert [row["device"] for row in rows] == list(IDS)
    assert all(row["ok"] and row["stopped"] and row["round"] >= 6 for row in rows)
    assert not any(agent.learning for agent in fleet_agents)

    listed = fleet_cli("ls", "--json", "--wait", "0", *connection)
    assert not any(row["learning"] for row in json.loads(listed.stdout))

    plot = tmp_path / "fleet.png"
    result = fleet_cli("metrics", "--json", "--plot", str(plot), *connection)
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert sorted(metrics["devices"]) == list(IDS) and metrics["errors"] == {}
    for device, agent in zip(IDS, fleet_agents, strict=True):
        rounds = metrics["devices"][device]
        assert rounds[0]["round"] == 0 and rounds[0]["train_loss"] is None
        assert rounds[-1]["round"] == agent.learner.round
        assert set(rounds[-1]) == {"round", "accuracy", "train_loss", "merged", "ts"}
        assert metrics["learning"][device]["on"] is False
    assert sum(r["merged"] for rounds in metrics["devices"].values() for r in rounds) > 0
    mean = metrics["mean"]
    assert mean[0]["round"] == 0 and mean[0]["devices"] == 3
    full = [m for m in mean if m["devices"] == 3]  # rounds every device reached
    assert full[-1]["round"] >= 6 and full[-1]["accuracy"] > full[0]["accuracy"] + 0.15, mean
    from PIL import Image

    with Image.open(plot) as image:
        assert image.format == "PNG"

    table = fleet_cli("metrics", "--to", "pi-00,pi-02", *connection)
    assert table.exit_code == 0, table.output
    header = next(line for line in table.stdout.splitlines() if line.lstrip().startswith("round"))
    assert "pi-00" in header and "pi-02" in header and "pi-01" not in header
    assert "mean" in header


def test_learn_start_wait_returns_when_every_run_has_reached_its_rounds(
    mosquitto, agents, key_file, artifact, tmp_path, shards
):
    fleet_agents = _start_fleet(agents, mosquitto.url, key_file, artifact, tmp_path, shards)
    connection = flags(mosquitto.url, key_file)
    args = ("learn", "start", "--all", "--local-steps", "2", "--rounds", "3", "--wait")
    result = fleet_cli(*args, "--json", *connection)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["device"] for row in rows] == list(IDS)
    for row, agent in zip(rows, fleet_agents, strict=True):
        assert not agent.learning and agent.learner.round == 3  # it returned after the runs
        assert row["ok"] and row["final"]["round"] == 3
        assert row["final"]["accuracy"] == agent.learner.metrics["accuracy"]

    again = fleet_cli(*args, *connection)  # resumed at round 3 of 3: ends at once
    assert again.exit_code == 0, again.output
    assert again.stdout.count("finished") == len(IDS) and "round 3" in again.stdout

    endless = fleet_cli("learn", "start", "--all", "--rounds", "0", "--wait", *connection)
    assert endless.exit_code != 0 and "--wait needs runs that end" in endless.output
    assert not any(agent.learning for agent in fleet_agents)  # refused before sending


def test_learn_start_reports_each_device_that_cannot_learn(
    mosquitto, agents, key_file, artifact, tmp_path
):
    agents(
        agent_config(mosquitto.url, key_file, tmp_path / "a", id="pi-00", artifact=str(artifact))
    )
    connection = flags(mosquitto.url, key_file)
    result = fleet_cli("learn", "start", "--to", "pi-00", "--json", *connection)
    assert result.exit_code == 1
    (row,) = json.loads(result.stdout)
    assert row["device"] == "pi-00" and not row["ok"] and "data_dir" in row["error"]
    # the connection flags may come after `fleet` too, above the learn sub-command
    table = fleet_cli(*connection, "learn", "start", "--to", "pi-00")
    assert table.exit_code == 1 and "failed" in table.stdout and "data_dir" in table.stdout
    # metrics of a device that never learned: no rounds, no error
    result = fleet_cli("metrics", "--json", *connection)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["devices"] == {"pi-00": []}
    result = fleet_cli("metrics", *connection)
    assert result.exit_code == 0 and "no learning round reported yet" in result.stdout
    result = fleet_cli("metrics", "--plot", str(tmp_path / "none.png"), *connection)
    assert result.exit_code == 1 and "nothing to plot" in result.output


# ------------------------------------------------------------------------------ bad input
def test_bad_targets_are_one_line_and_nothing_is_sent(
    mosquitto, agents, key_file, artifact, tmp_path
):
    connection = flags(mosquitto.url, key_file)
    for args in (("learn", "start", "--all"), ("metrics",), ("learn", "stop", "--to", "pi-00")):
        result = fleet_cli(*args, *connection)
        assert result.exit_code == 1
        assert "no device has announced itself on fleet lab" in one_line(result.output)

    agent = agents(
        agent_config(mosquitto.url, key_file, tmp_path / "a", id="pi-00", artifact=str(artifact))
    )
    result = fleet_cli("learn", "start", "--to", "pi-00,pi-07", *connection)
    assert result.exit_code == 1
    line = one_line(result.output)
    assert "no device pi-07" in line and "known: pi-00" in line
    assert not agent.learning  # pi-00 was named too, but nothing went out

    for args in (("learn", "start"), ("learn", "stop", "--to", "pi-00", "--all")):
        result = fleet_cli(*args, *connection)
        assert result.exit_code != 0 and ("--to" in result.output and "--all" in result.output)
    result = fleet_cli("learn", "start", "--all", "--merge", "median", *connection)
    assert result.exit_code != 0 and "--merge" in result.output
    result = fleet_cli("learn", "start", "--all", "--vc-rule", "dfl3", *connection)
    assert result.exit_code != 0 and "--vc-rule must be bitfleet or dfl2" in result.output
    result = fleet_cli("learn", "start", "--all", "--peers", "0", *connection)
    assert result.exit_code != 0 and "--peers" in result.output

    agent.shutdown()
    result = fleet_cli("learn", "stop", "--to", "pi-00", *connection)
    assert result.exit_code == 1 and "pi-00 is offline" in one_line(result.output)
    result = fleet_cli("metrics", "--json", *connection)
    assert result.exit_code == 1
    assert "no device of fleet lab is online" in one_line(result.output)


def test_a_wrong_key_says_no_device_accepted_the_command(
    mosquitto, agents, key_file, artifact, tmp_path
):
    agents(
        agent_config(mosquitto.url, key_file, tmp_path / "a", id="pi-00", artifact=str(artifact))
    )
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"w" * 32)
    for args in (("learn", "start", "--all"), ("metrics", "--json")):
        result = fleet_cli(*args, *flags(mosquitto.url, wrong))
        assert result.exit_code == 1
        line = one_line(result.output)
        assert "no device accepted the command" in line and "pi-00" in line
        assert "key may be wrong" in line and str(wrong) in line


def test_an_unreachable_broker_is_one_line_within_seconds(key_file):
    url = f"mqtt://127.0.0.1:{free_port()}"
    for args in (("learn", "start", "--all"),):  # metrics connects the same way
        started = time.monotonic()
        result = fleet_cli(*args, *flags(url, key_file))
        assert time.monotonic() - started < 10
        assert result.exit_code == 1 and url in one_line(result.output)
    # the choice of devices is checked before the broker is tried
    result = fleet_cli("learn", "start", "--to", "pi/01", *flags(url, key_file))
    assert result.exit_code == 1 and "invalid device id" in one_line(result.output)
    result = fleet_cli("metrics", "--to", "pi-01", "--all", *flags(url, key_file))
    assert result.exit_code == 1 and "not both" in one_line(result.output)
    assert url not in result.output


def test_a_device_that_does_not_answer_is_an_error_not_a_hang(
    mosquitto, fleet, agents, key_file, artifact, tmp_path
):
    """A device whose state says online but that stays silent: its error, within --timeout."""
    agents(
        agent_config(mosquitto.url, key_file, tmp_path / "a", id="pi-00", artifact=str(artifact))
    )
    ghost(fleet, "pi-09")
    connection = flags(mosquitto.url, key_file)
    started = time.monotonic()
    result = fleet_cli("metrics", "--json", "--timeout", "1", *connection)
    assert time.monotonic() - started < 8
    assert result.exit_code == 1
    metrics = json.loads(result.stdout)
    assert metrics["devices"] == {"pi-00": []}
    assert list(metrics["errors"]) == ["pi-09"] and "did not answer" in metrics["errors"]["pi-09"]
    assert "pi-09" in result.stderr

    result = fleet_cli("learn", "stop", "--all", "--timeout", "1", "--json", *connection)
    assert result.exit_code == 1
    rows = {row["device"]: row for row in json.loads(result.stdout)}
    assert rows["pi-00"]["ok"] and rows["pi-00"]["stopped"] is False
    assert not rows["pi-09"]["ok"] and "did not answer" in rows["pi-09"]["error"]
