"""Staged rollout (toolkit.rollout) end to end: real brokers, in-process agents, real deploys."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_support import FLEET, agent_config, online

from edge_agent.protocol import Command
from exporters.artifact import ArtifactError
from toolkit.fleet import FleetClient
from toolkit.rollout import (
    DEPLOYED,
    FAILED,
    OFFLINE,
    ROLLED_BACK,
    SKIPPED,
    RolloutError,
    RolloutEvent,
    plan_waves,
    rollout,
)

IDS = ["pi-01", "pi-02", "pi-03", "pi-04"]


# ------------------------------------------------------------------------------- artifacts
def lenet_artifact(root: Path, version: str, bias: float | None = None) -> Path:
    """A LeNet-5 artifact, name digits, input 1x32x32; ``bias`` fills its last layer's bias."""
    import torch

    import exporters
    import models

    model = models.create("lenet5").eval()
    if bias is not None:
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.bias.fill_(bias)
    return exporters.export(
        model, root, "onnx-portable", name="digits", version=version, input_shape=(1, 32, 32)
    )


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A healthy LeNet-5 artifact, digits version 2."""
    return lenet_artifact(tmp_path_factory.mktemp("art") / "v2", "2")


@pytest.fixture(scope="module")
def unhealthy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits version 2 whose last bias is +inf: it exports and loads, but every logit is inf,
    so the device's health check (finite logits on a probe batch) refuses it."""
    return lenet_artifact(tmp_path_factory.mktemp("art") / "bad", "2", bias=math.inf)


# ---------------------------------------------------------------------------------- helpers
def start_fleet(
    broker: Any, agents: Callable[..., Any], key_file: Path, v1: Path, tmp: Path, ids: list[str]
) -> dict[str, Any]:
    """One in-process agent per id, each serving ``v1`` from its own state directory."""
    return {
        device: agents(
            agent_config(broker.url, key_file, tmp / device, id=device, artifact=str(v1))
        )
        for device in ids
    }


def take_offline(fleet: dict[str, Any], client: FleetClient, device: str) -> None:
    """Shut ``device``'s agent down and wait until ``client`` sees its retained ``offline``."""
    fleet[device].shutdown()
    assert client.wait_for(lambda d: d[device]["status"] == "offline")


def clients(key_file: Path) -> Iterator[Callable[..., FleetClient]]:
    """A factory of connected laptop clients that see the given devices online; then closes."""
    made: list[FleetClient] = []

    def connect(url: str, ids: list[str], key: Path | None = None) -> FleetClient:
        client = FleetClient(url, fleet=FLEET, key_file=key or key_file)
        made.append(client)
        client.connect()
        for device in ids:
            assert client.wait_for(online(device)), device
        return client

    yield connect
    for client in made:
        client.close()


@pytest.fixture
def client_for(key_file: Path) -> Iterator[Callable[..., FleetClient]]:
    yield from clients(key_file)


def outcomes(result: Any) -> dict[str, str]:
    return {d["id"]: d["outcome"] for d in result.to_dict()["devices"]}


def history(client: FleetClient, device: str) -> dict[str, Any]:
    reply = client.command(device, Command.HISTORY)
    assert reply["ok"], reply
    return reply["result"]


def versions_deployed(client: FleetClient, device: str) -> list[str]:
    return [e["version"] for e in history(client, device)["events"] if e["event"] == "deploy"]


def serves(client: FleetClient, device: str, version: str) -> None:
    """``device`` answers an inference with ``version``, and its history says it is active."""
    reply = client.infer(device, np.zeros((1, 1, 32, 32), np.float32))
    assert reply["ok"] and reply["result"]["version"] == version, reply
    assert history(client, device)["active"]["version"] == version


# ------------------------------------------------------------------------------ the plan
def test_waves_start_with_the_canary_then_double():
    ids = [f"d{i}" for i in range(10)]
    assert plan_waves(ids, 0.1) == [["d0"], ["d1", "d2"], ["d3", "d4", "d5", "d6"], ids[7:]]
    assert plan_waves(ids[:4], 0.25) == [["d0"], ["d1", "d2"], ["d3"]]
    assert plan_waves(ids[:3], 0.5) == [["d0", "d1"], ["d2"]]
    assert plan_waves(ids[:3], 1.0) == [ids[:3]]
    assert plan_waves(ids[:1], 0.01) == [["d0"]]  # at least one
    for canary in (0, 1.5, -0.1, math.nan, True):
        with pytest.raises(ValueError, match=r"canary must be .* in \(0, 1\]"):
            plan_waves(ids, canary)


# -------------------------------------------------------------------------- healthy rollout
def test_a_canary_rollout_reaches_every_device(
    broker, agents, client_for, key_file, artifact, v2, tmp_path
):
    fleet = start_fleet(broker, agents, key_file, artifact, tmp_path, IDS)
    client = client_for(broker.url, IDS)
    events: list[RolloutEvent] = []
    result = rollout(client, v2, IDS, canary=0.25, timeout_s=20, on_progress=events.append)
    assert result.ok and result.error is None, result.to_dict()
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["canary"] == ["pi-01"]
    assert doc["waves"] == [["pi-01"], ["pi-02", "pi-03"], ["pi-04"]]
    assert doc["devices"] == [
        {"id": "pi-01", "outcome": DEPLOYED, "wave": 0, "error": None},
        {"id": "pi-02", "outcome": DEPLOYED, "wave": 1, "error": None},
        {"id": "pi-03", "outcome": DEPLOYED, "wave": 1, "error": None},
        {"id": "pi-04", "outcome": DEPLOYED, "wave": 2, "error": None},
    ]
    assert doc["rolled_back"] == []
    assert doc["artifact"]["name"] == "digits" and doc["artifact"]["version"] == "2"
    assert len(doc["artifact"]["sha256"]) == 64
    for device, agent in fleet.items():
        assert agent.artifact.version == "2" and agent.store.last_good().version == "1"
        assert versions_deployed(client, device) == ["2"]
    # the canary answered before the next wave started; the waves went in order
    steps = [(e.kind, e.wave, e.device) for e in events]
    assert steps[0] == ("published", None, None) and steps[-1][0] == "finished"
    assert steps.index(("device_done", 0, "pi-01")) < steps.index(("wave_started", 1, None))
    assert steps.index(("device_done", 1, "pi-03")) < steps.index(("wave_started", 2, None))
    assert [e.devices for e in events if e.kind == "wave_started"] == [
        ("pi-01",),
        ("pi-02", "pi-03"),
        ("pi-04",),
    ]


# ---------------------------------------------------------------------- stopped rollouts
def test_an_artifact_failing_the_health_check_stops_at_the_canary(
    mosquitto, agents, client_for, key_file, artifact, unhealthy, tmp_path
):
    fleet = start_fleet(mosquitto, agents, key_file, artifact, tmp_path, IDS)
    client = client_for(mosquitto.url, IDS)
    result = rollout(client, unhealthy, IDS, canary=0.25, timeout_s=10)
    assert not result.ok
    assert outcomes(result) == {
        "pi-01": FAILED,
        "pi-02": SKIPPED,
        "pi-03": SKIPPED,
        "pi-04": SKIPPED,
    }
    canary = result.to_dict()["devices"][0]
    assert "health check failed" in canary["error"] and "non-finite" in canary["error"]
    assert "1 device failed, more than the 0 tolerated" in result.error
    assert "health check failed" in result.error
    assert result.rolled_back == []
    for device, agent in fleet.items():
        serves(client, device, "1")  # the canary never swapped; the rest were never asked
        assert versions_deployed(client, device) == []
        assert agent.store.last_good() is None


def test_one_canary_fails_so_the_other_is_rolled_back(
    mosquitto, agents, client_for, key_file, artifact, v2, tmp_path
):
    fleet = start_fleet(mosquitto, agents, key_file, artifact, tmp_path, IDS)
    client = client_for(mosquitto.url, IDS)

    def hang_pi_02(event: RolloutEvent) -> None:
        # pi-02's agent stops carrying out slow commands as the canary wave starts: it stays
        # online, takes the deploy and never answers (a hung device)
        if event.kind == "wave_started" and event.wave == 0:
            fleet["pi-02"].worker.stop()

    started = time.monotonic()
    result = rollout(client, v2, IDS, canary=0.5, timeout_s=2, on_progress=hang_pi_02)
    assert time.monotonic() - started < 10
    assert not result.ok and result.canary == ["pi-01", "pi-02"]
    doc = result.to_dict()
    assert outcomes(result) == {
        "pi-01": ROLLED_BACK,
        "pi-02": FAILED,
        "pi-03": SKIPPED,
        "pi-04": SKIPPED,
    }
    assert doc["devices"][1]["error"] == "no reply within 2 s"
    assert doc["rolled_back"] == ["pi-01"]
    assert fleet["pi-01"].artifact.version == "1"
    events = history(client, "pi-01")["events"]
    assert [(e["event"], e["version"]) for e in events] == [
        ("initial", "1"),
        ("deploy", "2"),
        ("rollback", "1"),
    ]
    for device in ("pi-03", "pi-04"):
        serves(client, device, "1")
        assert versions_deployed(client, device) == []
    assert fleet["pi-02"].artifact.version == "1"


def test_a_device_that_activates_after_the_timeout_is_rolled_back_too(
    mosquitto, agents, client_for, key_file, artifact, v2, tmp_path
):
    fleet = start_fleet(mosquitto, agents, key_file, artifact, tmp_path, IDS[:2])
    client = client_for(mosquitto.url, IDS[:2])
    fleet["pi-02"].worker.submit(lambda: time.sleep(2.0))  # busy: its deploy waits its turn
    result = rollout(client, v2, IDS[:2], canary=1.0, timeout_s=1.5)
    assert not result.ok and "no reply within 1.5 s" in result.error
    assert outcomes(result) == {"pi-01": ROLLED_BACK, "pi-02": ROLLED_BACK}
    assert "after the 1.5 s timeout" in result.to_dict()["devices"][1]["error"]
    for device in IDS[:2]:
        serves(client, device, "1")
        assert versions_deployed(client, device) == ["2"]


def test_failures_up_to_max_failures_are_tolerated(
    mosquitto, agents, client_for, key_file, artifact, v2, tmp_path
):
    fleet = start_fleet(mosquitto, agents, key_file, artifact, tmp_path, IDS[:3])
    client = client_for(mosquitto.url, IDS[:3])
    fleet["pi-03"].worker.stop()  # hung: takes the deploy, never answers
    result = rollout(client, v2, IDS[:3], canary=0.3, max_failures=1, timeout_s=1.5)
    assert result.ok and result.error is None, result.to_dict()
    assert result.waves == [["pi-01"], ["pi-02", "pi-03"]]
    assert outcomes(result) == {"pi-01": DEPLOYED, "pi-02": DEPLOYED, "pi-03": FAILED}
    assert result.rolled_back == []
    for device in IDS[:2]:
        serves(client, device, "2")


# ------------------------------------------------------------------------------- offline
def test_an_offline_target_is_reported_not_waited_for(
    mosquitto, agents, client_for, key_file, artifact, v2, tmp_path
):
    fleet = start_fleet(mosquitto, agents, key_file, artifact, tmp_path, IDS[:3])
    client = client_for(mosquitto.url, IDS[:3])
    take_offline(fleet, client, "pi-03")
    started = time.monotonic()
    result = rollout(client, v2, IDS[:3], canary=0.5, timeout_s=30)
    assert time.monotonic() - started < 10  # not 30: nobody waited for pi-03
    assert result.ok, result.to_dict()
    assert result.to_dict()["devices"][2] == {
        "id": "pi-03",
        "outcome": OFFLINE,
        "wave": None,
        "error": None,
    }
    assert outcomes(result) == {"pi-01": DEPLOYED, "pi-02": DEPLOYED, "pi-03": OFFLINE}
    assert result.waves == [["pi-01"], ["pi-02"]]

    # with wait=True it waits for pi-03, up to the timeout, in a last wave of its own
    started = time.monotonic()
    result = rollout(client, v2, IDS[:3], canary=0.5, timeout_s=1, wait=True)
    assert 1 <= time.monotonic() - started < 8
    assert outcomes(result)["pi-03"] == OFFLINE and result.waves[-1] == ["pi-03"]


def test_with_wait_a_target_that_comes_online_gets_the_artifact(
    mosquitto, agents, client_for, key_file, artifact, v2, tmp_path
):
    fleet = start_fleet(mosquitto, agents, key_file, artifact, tmp_path, IDS[:2])
    client = client_for(mosquitto.url, IDS[:2])
    take_offline(fleet, client, "pi-02")

    def restart(event: RolloutEvent) -> None:
        if event.kind == "waiting":  # pi-02 comes back while the rollout waits for it
            config = agent_config(mosquitto.url, key_file, tmp_path / "pi-02", id="pi-02")
            fleet["pi-02"] = agents(config)

    result = rollout(client, v2, IDS[:2], timeout_s=15, wait=True, on_progress=restart)
    assert result.ok, result.to_dict()
    assert result.waves == [["pi-01"], ["pi-02"]]
    assert outcomes(result) == {"pi-01": DEPLOYED, "pi-02": DEPLOYED}
    serves(client, "pi-02", "2")


# ---------------------------------------------------------------------------- bad input
def _artifact_topics(transports: Callable[..., Any], url: str) -> list[str]:
    """The artifact chunks the broker retains (what a rollout would have published)."""
    seen: list[str] = []
    listener = transports(url)
    listener.subscribe(f"bitfleet/{FLEET}/artifacts/#", lambda topic, _p: seen.append(topic))
    listener.connect(timeout=5)
    assert listener.wait_subscribed(5)
    time.sleep(0.3)
    return seen


def test_bad_input_raises_before_anything_is_sent(
    mosquitto, agents, client_for, transports, key_file, artifact, v2, tmp_path
):
    start_fleet(mosquitto, agents, key_file, artifact, tmp_path, IDS[:2])
    client = client_for(mosquitto.url, IDS[:2])
    with pytest.raises(RolloutError, match=r"unknown device pi-09: .* known devices: pi-01, pi-02"):
        rollout(client, v2, ["pi-01", "pi-09"])
    with pytest.raises(ValueError, match="no target devices"):
        rollout(client, v2, [])
    for canary in (0, 1.5):
        with pytest.raises(ValueError, match=r"canary must be .* in \(0, 1\]"):
            rollout(client, v2, IDS[:2], canary=canary)
    with pytest.raises(ValueError, match="max_failures"):
        rollout(client, v2, IDS[:2], max_failures=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        rollout(client, v2, IDS[:2], timeout_s=0)
    tampered = shutil.copytree(v2, tmp_path / "tampered")
    model = tampered / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the SHA-256"):
        rollout(client, tampered, IDS[:2])
    with pytest.raises(ArtifactError, match="does not match the SHA-256"):
        rollout(client, tampered, ["pi-09"])  # the artifact is checked first
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"w" * 32)
    stranger = FleetClient(mosquitto.url, fleet=FLEET, key_file=wrong)
    with stranger:
        assert stranger.wait_for(lambda _d: len(stranger.unverified()) == 2)
        with pytest.raises(RolloutError, match="no device would accept .* key may be wrong"):
            rollout(stranger, v2, IDS[:2])
    assert _artifact_topics(transports, mosquitto.url) == []  # nothing was published
    for device in IDS[:2]:
        serves(client, device, "1")
        assert versions_deployed(client, device) == []


def test_no_target_online_is_an_error(
    mosquitto, agents, client_for, transports, key_file, artifact, v2, tmp_path
):
    fleet = start_fleet(mosquitto, agents, key_file, artifact, tmp_path, IDS[:1])
    client = client_for(mosquitto.url, IDS[:1])
    take_offline(fleet, client, "pi-01")
    with pytest.raises(RolloutError, match=r"none of the targets is online \(pi-01 offline\)"):
        rollout(client, v2, ["pi-01"])
    started = time.monotonic()
    with pytest.raises(RolloutError, match="none of the targets is online"):
        rollout(client, v2, ["pi-01"], wait=True, timeout_s=0.5)
    assert time.monotonic() - started >= 0.5
    assert _artifact_topics(transports, mosquitto.url) == []
