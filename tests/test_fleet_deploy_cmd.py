"""`bitfleet fleet deploy | rollback | history` on a real Mosquitto with in-process agents."""

from __future__ import annotations

import json
import math
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_support import agent_config
from fleet_cli_support import fails_with_one_line, flags, fleet_cli, one_line
from test_rollout import (
    clients,
    history,
    lenet_artifact,
    serves,
    start_fleet,
    take_offline,
    versions_deployed,
)

from edge_agent.broker import free_port
from toolkit.cli.fleet_deploy_cmd import parse_canary
from toolkit.fleet import FleetClient

IDS = ["pi-01", "pi-02", "pi-03", "pi-04"]

pytestmark = pytest.mark.usefixtures("no_user_settings")


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lenet_artifact(tmp_path_factory.mktemp("art") / "v2", "2")


@pytest.fixture(scope="module")
def unhealthy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Its last bias is +inf: every logit is inf, so the device's health check refuses it."""
    return lenet_artifact(tmp_path_factory.mktemp("art") / "bad", "2", bias=math.inf)


@pytest.fixture
def client_for(key_file: Path) -> Iterator[Callable[..., FleetClient]]:
    yield from clients(key_file)


def test_canary_percentages():
    assert parse_canary("10%") == pytest.approx(0.1)
    assert parse_canary("10") == pytest.approx(0.1)
    assert parse_canary(" 25 % ") == pytest.approx(0.25)
    assert parse_canary("100%") == 1.0
    for text in ("0%", "0", "150%", "-5%", "nan", "ten", "%"):
        with pytest.raises(ValueError, match="--canary"):
            parse_canary(text)


# ---------------------------------------------------------------------- deploy, and back
def test_deploy_history_and_rollback(
    mosquitto, agents, client_for, key_file, artifact, v2, tmp_path
):
    fleet = start_fleet(mosquitto, agents, key_file, artifact, tmp_path, IDS)
    client_for(mosquitto.url, IDS)
    connection = flags(mosquitto.url, key_file)
    result = fleet_cli(
        "deploy", str(v2), "--all", "--canary", "25%", "--timeout", "20", "--json", *connection
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["error"] is None
    assert doc["canary"] == ["pi-01"] and doc["waves"] == [["pi-01"], ["pi-02", "pi-03"], ["pi-04"]]
    assert [d["outcome"] for d in doc["devices"]] == ["deployed"] * 4
    assert (doc["artifact"]["name"], doc["artifact"]["version"]) == ("digits", "2")
    assert all(agent.artifact.version == "2" for agent in fleet.values())
    assert "canary" in result.stderr and "wave 2" in result.stderr  # the progress bars

    result = fleet_cli("history", "pi-03", "--json", *connection)
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["id"] == "pi-03" and row["error"] is None
    assert row["active"]["version"] == "2" and row["last_good"]["version"] == "1"
    assert [(e["event"], e["version"]) for e in row["events"]] == [
        ("initial", "1"),
        ("deploy", "2"),
    ]
    table = fleet_cli("history", *connection)
    assert table.exit_code == 0, table.output
    for device in IDS:
        assert f"{device}: serves digits 2, last good digits 1" in table.stdout
    assert table.stdout.count("deploy") == 4

    result = fleet_cli("rollback", "--to", "pi-01,pi-02", "--json", *connection)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"id": "pi-01", "ok": True, "name": "digits", "version": "1", "error": None},
        {"id": "pi-02", "ok": True, "name": "digits", "version": "1", "error": None},
    ]
    assert [fleet[d].artifact.version for d in IDS] == ["1", "1", "2", "2"]
    table = fleet_cli("rollback", "--all", *connection)  # the two swap back and forth
    assert table.exit_code == 0, table.output
    assert table.stdout.count("digits 2") == 2 and table.stdout.count("digits 1") == 2
    assert [fleet[d].artifact.version for d in IDS] == ["2", "2", "1", "1"]


def test_a_rollback_without_a_last_good_model_fails(
    mosquitto, agents, client_for, key_file, artifact, tmp_path
):
    start_fleet(mosquitto, agents, key_file, artifact, tmp_path, IDS[:1])
    client_for(mosquitto.url, IDS[:1])
    result = fleet_cli("rollback", "--all", "--json", *flags(mosquitto.url, key_file))
    assert result.exit_code == 1
    [row] = json.loads(result.stdout)
    assert not row["ok"] and "no last-good" in row["error"]
    assert "pi-01 did not roll back" in one_line(result.stderr)


def test_an_unhealthy_artifact_stops_at_the_canary(
    mosquitto, agents, client_for, key_file, artifact, unhealthy, tmp_path
):
    fleet = start_fleet(mosquitto, agents, key_file, artifact, tmp_path, IDS[:3])
    client = client_for(mosquitto.url, IDS[:3])
    connection = flags(mosquitto.url, key_file)
    result = fleet_cli(
        "deploy", str(unhealthy), "--to", "pi-01,pi-02,pi-03", "--timeout", "10", *connection
    )
    assert result.exit_code == 1
    rows = {row[0]: row for row in map(str.split, result.stdout.splitlines()) if row}
    assert rows["pi-01"][:3] == ["pi-01", "canary", "failed"]
    assert "health check failed" in " ".join(rows["pi-01"])
    assert rows["pi-02"] == ["pi-02", "1", "skipped"] and rows["pi-03"] == ["pi-03", "1", "skipped"]
    assert "1 failed, 2 skipped" in result.stdout
    assert "canary (1 failed)" in result.stderr  # its progress bar
    assert "more than the 0 tolerated (--max-failures)" in result.stderr.splitlines()[-1]
    json_run = fleet_cli("deploy", str(unhealthy), "--all", "--canary", "10", "--json", *connection)
    assert json_run.exit_code == 1
    doc = json.loads(json_run.stdout)
    assert not doc["ok"] and [d["outcome"] for d in doc["devices"]] == [
        "failed",
        "skipped",
        "skipped",
    ]
    for device in IDS[:3]:
        serves(client, device, "1")
        assert versions_deployed(client, device) == []
        assert fleet[device].store.last_good() is None


def test_an_offline_target_is_reported(
    mosquitto, agents, client_for, key_file, artifact, v2, tmp_path
):
    fleet = start_fleet(mosquitto, agents, key_file, artifact, tmp_path, IDS[:2])
    client = client_for(mosquitto.url, IDS[:2])
    take_offline(fleet, client, "pi-02")
    connection = flags(mosquitto.url, key_file)
    packed = tmp_path / "v2.tar"  # a .tar of the artifact deploys the same
    with tarfile.open(packed, "w") as archive:
        archive.add(v2, arcname="v2")
    started = time.monotonic()
    result = fleet_cli("deploy", str(packed), "--all", "--canary", "100%", "--json", *connection)
    assert time.monotonic() - started < 10
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["artifact"]["version"] == "2" and doc["waves"] == [["pi-01"]]
    outcomes = {d["id"]: d["outcome"] for d in doc["devices"]}
    assert outcomes == {"pi-01": "deployed", "pi-02": "offline"}
    assert fleet["pi-01"].artifact.version == "2"
    started = time.monotonic()
    result = fleet_cli("deploy", str(v2), "--all", "--wait", "--timeout", "1", *connection)
    assert 1 <= time.monotonic() - started < 10
    assert result.exit_code == 0, result.output
    assert "waiting for pi-02 to come online" in result.stderr
    rows = {row[0]: row for row in map(str.split, result.stdout.splitlines()) if row}
    assert " ".join(rows["pi-02"]) == "pi-02 1 offline still offline after 1 s of waiting"
    fails_with_one_line(fleet_cli("rollback", "--to", "pi-02", *connection), "pi-02 is offline")
    fails_with_one_line(fleet_cli("history", "pi-02", "--json", *connection), "pi-02 is offline")
    result = fleet_cli("history", *connection)  # the online ones, and a note of the others
    assert result.exit_code == 0 and "pi-01: serves digits 2" in result.stdout
    assert "offline, not asked: pi-02" in result.stderr


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_one_line_and_deploys_nothing(
    mosquitto, agents, client_for, key_file, artifact, v2, tmp_path
):
    start_fleet(mosquitto, agents, key_file, artifact, tmp_path, IDS[:2])
    client = client_for(mosquitto.url, IDS[:2])
    connection = flags(mosquitto.url, key_file)
    tampered = shutil.copytree(v2, tmp_path / "tampered")
    model = tampered / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"w" * 32)
    art = str(v2)
    for args, expected in (
        (["--to", "pi-01,pi-09"], ["unknown device pi-09", "known devices: pi-01, pi-02"]),
        (["--all", "--canary", "0%"], ["--canary", "0%"]),
        (["--all", "--canary", "150%"], ["--canary", "150%"]),
        (["--all", "--canary", "ten"], ["--canary", "'ten'"]),
        (["--to", "pi-01", "--all"], ["pass --to ID[,ID] or --all, not both"]),
        ([], ["name the devices with --to ID[,ID], or pass --all"]),
        (["--to", "pi-01,"], ["--to takes device ids"]),
    ):
        fails_with_one_line(fleet_cli("deploy", art, *args, "--json", *connection), *expected)
    fails_with_one_line(
        fleet_cli("deploy", str(tampered), "--all", "--json", *connection),
        "model.onnx does not match the SHA-256",
    )
    fails_with_one_line(
        fleet_cli("deploy", str(tmp_path / "nowhere"), "--all", *connection), "does not exist"
    )
    line = fails_with_one_line(
        fleet_cli("deploy", art, "--all", "--json", *flags(mosquitto.url, wrong)),
        "no device would accept the deploy command",
        "key may be wrong",
    )
    assert "pi-01" in line and "pi-02" in line
    fails_with_one_line(
        fleet_cli("rollback", "--all", *flags(mosquitto.url, wrong)), "key may be wrong"
    )
    fails_with_one_line(fleet_cli("history", "pi-09", *connection), "pi-09", "known: pi-01")
    for device in IDS[:2]:
        serves(client, device, "1")
        assert versions_deployed(client, device) == []
        assert [e["event"] for e in history(client, device)["events"]] == ["initial"]


def test_an_empty_fleet_and_an_unreachable_broker_are_one_line(mosquitto, key_file, v2):
    connection = flags(mosquitto.url, key_file)
    fails_with_one_line(
        fleet_cli("deploy", str(v2), "--all", "--json", *connection),
        "no device has announced itself on fleet lab",
    )
    fails_with_one_line(
        fleet_cli("deploy", str(v2), "--to", "pi-01", *connection),
        "unknown device pi-01",
        "no device has announced itself",
    )
    fails_with_one_line(fleet_cli("rollback", "--all", *connection), "no device")
    fails_with_one_line(fleet_cli("history", *connection), "no device")
    url = f"mqtt://127.0.0.1:{free_port()}"
    started = time.monotonic()
    fails_with_one_line(fleet_cli("deploy", str(v2), "--all", *flags(url, key_file)), url)
    assert time.monotonic() - started < 10
    # the artifact is checked first: a missing one is named, whatever the broker
    missing = fleet_cli("deploy", "nowhere", "--all", *flags(url, key_file))
    fails_with_one_line(missing, "artifact nowhere does not exist")


def test_devices_that_drop_the_deploy_command_are_named(
    mosquitto, agents, client_for, key_file, artifact, v2, tmp_path
):
    """The laptop verifies pi-01 (its own key) but signs with another fleet key: pi-01 drops
    every command without a word, so the canary times out; the CLI says why, and stops."""
    keys = tmp_path / "device-keys"
    keys.mkdir()
    (keys / "pi-01.key").write_bytes(b"d" * 32)
    config = agent_config(
        mosquitto.url,
        key_file,
        tmp_path / "pi-01",
        artifact=str(artifact),
        device_keys_dir=str(keys),
    )
    agent = agents(config)
    wrong = tmp_path / "other-fleet.key"
    wrong.write_bytes(b"w" * 32)
    client_for(mosquitto.url, [], key=key_file)
    started = time.monotonic()
    result = fleet_cli(
        "deploy",
        str(v2),
        "--all",
        "--timeout",
        "1",
        "--json",
        *flags(mosquitto.url, wrong),
        prefix=("--device-keys-dir", str(keys)),
    )
    assert time.monotonic() - started < 10
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["devices"] == [
        {"id": "pi-01", "outcome": "failed", "wave": 0, "error": "no reply within 1 s"}
    ]
    line = one_line(result.stderr.splitlines()[-1])
    assert "no device accepted the deploy command" in line and "key" in line
    assert agent.artifact.version == "1" and agent.store.last_good() is None
