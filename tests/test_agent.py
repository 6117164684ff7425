"""The edge agent against real brokers: presence, inference, deploy, learning, crashes, fuzz.

No mocks: every test starts Mosquitto (or the embedded amqtt broker) on a free loopback port,
runs agents in this process (or as ``bitfleet-agent`` subprocesses where a test kills them),
and talks to them through :class:`toolkit.fleet.FleetClient`, the laptop's real client.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from agent_support import FLEET, agent_config, daemon_args, online
from safetensors.numpy import save_file

import exporters
import models
from edge_agent import broker as broker_module
from edge_agent.agent import Agent
from edge_agent.broker import (
    BrokerError,
    MosquittoBroker,
    free_port,
    mosquitto_available,
    mosquitto_binary,
)
from edge_agent.codecs import decode
from edge_agent.commands import CommandError, CommandTable, Handler
from edge_agent.config import ConfigError, LearnSettings, load_config
from edge_agent.protocol import (
    COMMANDS,
    Command,
    CommandRequest,
    FrameKind,
    FrameVerifier,
    Keyring,
    Topics,
    parse_reply,
    seal_binary,
    seal_json,
    split_chunks,
)
from edge_agent.state import StateStore
from exporters import runtime
from toolkit.data import load_dataset
from toolkit.fleet import FleetClient, FleetError
from toolkit.partition import partition

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> list[Path]:
    """Two LeNet-5 artifacts (versions 1 and 2) for 32x32 digits, portable flavour."""
    root = tmp_path_factory.mktemp("art")
    made = []
    for version in ("1", "2"):
        model = models.create("lenet5").eval()
        made.append(
            exporters.export(
                model,
                root / f"v{version}",
                "onnx-portable",
                name="digits",
                version=version,
                input_shape=(1, 32, 32),
            )
        )
    return made


@pytest.fixture(scope="module")
def bireal(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A tiny Bi-Real-18 for 1x32x32 digits and its fast (``onnx``, packed-bit) artifact."""
    torch.manual_seed(0)
    model = models.create("bireal18", stem="imagenet", width=0.125, in_channels=1).eval()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():  # batch norms that are not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    path = exporters.export(
        model,
        tmp_path_factory.mktemp("bnn") / "bnn",
        "onnx",
        name="digits-bnn",
        version="1",
        input_shape=(1, 32, 32),
    )
    assert json.loads((path / "manifest.json").read_text())["custom_ops"]  # binary kernels
    return model, path


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


# ------------------------------------------------------------------------------- presence
def test_presence_retained_state_and_clean_offline(
    mosquitto, fleet, agents, key_file, artifacts, tmp_path
):
    agent = agents(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifacts[0])))
    assert fleet.wait_for(online("pi-01"))
    state = fleet.devices()["pi-01"]
    assert (state["model"], state["version"]) == ("digits", "1")
    assert state["capabilities"] == ["infer", "deploy", "learn"] and state["agent_version"]
    # a late subscriber gets the retained state
    with FleetClient(mosquitto.url, fleet=FLEET, key_file=key_file) as late:
        assert late.wait_for(online("pi-01"))
    agent.shutdown()
    assert fleet.wait_for(lambda d: d["pi-01"]["status"] == "offline")


def test_presence_on_the_embedded_broker(amqtt_broker, key_file, artifacts, agents, tmp_path):
    agents(agent_config(amqtt_broker.url, key_file, tmp_path, artifact=str(artifacts[0])))
    with FleetClient(amqtt_broker.url, fleet=FLEET, key_file=key_file) as client:
        assert client.wait_for(online("pi-01"))
        reply = client.command("pi-01", "ping", timeout=10)
        assert reply["ok"] and reply["result"]["pong"]


@pytest.mark.parametrize("module", ["torch", "amqtt", "onnx", "exporters._native"])
def test_the_suite_has_every_component_it_needs(module):
    """A missing component fails here by name, never as a skip (Mosquitto: conftest.py)."""
    import importlib.util

    assert importlib.util.find_spec(module) is not None, f"{module} is missing"
    assert mosquitto_available()


def test_mosquitto_is_found_outside_path(tmp_path, monkeypatch):
    """Debian installs the broker in /usr/sbin, which a user's PATH often lacks."""
    assert {"/usr/sbin", "/usr/local/sbin"} <= set(broker_module._SBIN_DIRS)
    real = mosquitto_binary()
    assert real is not None
    sbin, empty = tmp_path / "sbin", tmp_path / "empty"
    sbin.mkdir()
    empty.mkdir()
    (sbin / "mosquitto").symlink_to(real)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(broker_module, "_SBIN_DIRS", (str(tmp_path / "none"), str(sbin)))
    assert mosquitto_binary() == str(sbin / "mosquitto") and mosquitto_available()
    with MosquittoBroker() as broker:  # started from the sbin directory, not PATH
        assert broker.running
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5):
            pass
    monkeypatch.setattr(broker_module, "_SBIN_DIRS", (str(tmp_path / "none"),))
    assert mosquitto_binary() is None and not mosquitto_available()
    with pytest.raises(BrokerError, match="mosquitto not found on PATH, in /usr/sbin"):
        MosquittoBroker().start()


def test_per_device_keys(mosquitto, agents, key_file, artifacts, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "pi-01.key").write_bytes(b"1" * 32)
    (keys / "laptop.key").write_bytes(b"L" * 32)
    agent = agents(
        agent_config(
            mosquitto.url,
            key_file,
            tmp_path / "s",
            artifact=str(artifacts[0]),
            device_keys_dir=str(keys),
        )
    )
    own = Keyring(key_file.read_bytes(), {"pi-01": b"1" * 32, "laptop": b"L" * 32})
    with FleetClient(mosquitto.url, fleet=FLEET, keyring=own) as client:
        assert client.wait_for(online("pi-01"))  # its state verifies under its own key
        assert client.command("pi-01", "ping")["ok"]
        assert client.command("pi-01", "config.set", {"heartbeat_s": 0.75})["ok"]
    assert agent.config.heartbeat_s == 0.75  # the laptop's own key commands it
    forged = agent.drop_counts().get("forged", 0)
    # the fleet key alone can no longer command it as "laptop": the device drops the frame as
    # forged and does not run it. (The client could not read a reply anyway, since the device
    # signs with its own key: the timeout alone would not tell refusal from acceptance.)
    with FleetClient(mosquitto.url, fleet=FLEET, key_file=key_file) as client:
        with pytest.raises(FleetError, match="did not answer 'config.set'"):
            client.command("pi-01", "config.set", {"heartbeat_s": 0.25}, timeout=1.5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and agent.drop_counts().get("forged", 0) == forged:
        time.sleep(0.05)
    assert agent.drop_counts().get("forged", 0) == forged + 1
    assert agent.config.heartbeat_s == 0.75
    assert agent.store.config_overrides() == {"heartbeat_s": 0.75}


def test_agent_speaks_mqtt5(mosquitto, fleet, agents, key_file, artifacts, tmp_path):
    agents(
        agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifacts[0]), protocol="5")
    )
    assert fleet.wait_for(online("pi-01"))
    assert fleet.command("pi-01", "ping")["ok"]


# ------------------------------------------------------------------------------ inference
def test_inference_over_mqtt_and_http_matches_the_artifact(
    mosquitto, fleet, agents, key_file, artifacts, tmp_path, digits
):
    port = free_port()
    agents(
        agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifacts[0]), http_port=port)
    )
    batch = digits[1].x[:4]
    direct = runtime.load(artifacts[0]).predict(batch)
    reply = fleet.infer("pi-01", batch)
    assert reply["ok"], reply
    np.testing.assert_allclose(np.asarray(reply["result"]["logits"]), direct, rtol=1e-5, atol=1e-5)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/infer",
        data=json.dumps({"inputs": batch.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        over_http = json.loads(response.read())
    np.testing.assert_allclose(np.asarray(over_http["logits"]), direct, rtol=1e-5, atol=1e-5)
    assert over_http["top1"] == direct.argmax(1).tolist()
    # bad input: one clear error, over both paths
    bad = fleet.infer("pi-01", np.zeros((1, 3, 32, 32), np.float32))
    assert not bad["ok"] and "does not fit this model" in bad["error"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/infer",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError, match="HTTP Error 400") as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_a_binary_network_is_served_over_mqtt_and_http(
    mosquitto, fleet, agents, key_file, bireal, tmp_path, digits
):
    """A Bi-Real net in the fast flavour: packed-bit kernels on the device, same logits."""
    model, artifact = bireal
    port = free_port()
    agent = agents(
        agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifact), http_port=port)
    )
    assert fleet.wait_for(online("pi-01"))
    assert (fleet.devices()["pi-01"]["model"], agent.artifact.name) == ("digits-bnn", "digits-bnn")
    assert isinstance(agent.predictor, runtime.FastPredictor)
    batch = digits[1].x[:8]
    direct = runtime.load(artifact).predict(batch)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    scale = float(np.abs(expected).max())
    assert np.abs(direct - expected).max() <= 1e-4 * scale  # the artifact is the network
    reply = fleet.infer("pi-01", batch)
    assert reply["ok"], reply
    over_mqtt = np.asarray(reply["result"]["logits"])
    np.testing.assert_allclose(over_mqtt, direct, rtol=1e-5, atol=1e-5 * scale)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/infer",
        data=json.dumps({"inputs": batch.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        over_http = json.loads(response.read())
    np.testing.assert_allclose(
        np.asarray(over_http["logits"]), direct, rtol=1e-5, atol=1e-5 * scale
    )
    assert over_http["top1"] == np.asarray(over_http["logits"]).argmax(1).tolist()


def test_a_tflite_artifact_is_served_over_mqtt(
    mosquitto, fleet, agents, key_file, bireal, tmp_path, digits
):
    """The same Bi-Real net as a .tflite (int8 binary form) on the device: LiteRT serves it."""
    model, _ = bireal
    artifact = exporters.export(
        model, tmp_path / "lite", "tflite", name="digits-lite", input_shape=(1, 32, 32)
    )
    agent = agents(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifact)))
    assert fleet.wait_for(online("pi-01"))
    assert isinstance(agent.predictor, runtime.TFLitePredictor)
    batch = digits[1].x[:8]
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    reply = fleet.infer("pi-01", batch)
    assert reply["ok"], reply
    logits = np.asarray(reply["result"]["logits"])
    assert np.abs(logits - expected).max() <= 1e-4 * float(np.abs(expected).max())
    assert reply["result"]["top1"] == expected.argmax(1).tolist()


def _http(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_status_unknown_paths_and_a_body_too_large(
    mosquitto, fleet, agents, key_file, artifacts, tmp_path
):
    from edge_agent.http import MAX_BODY_BYTES

    port = free_port()
    agents(
        agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifacts[0]), http_port=port)
    )
    assert fleet.wait_for(online("pi-01"))
    code, status = _http(port, "GET", "/status")
    assert code == 200
    assert (status["model"], status["version"]) == ("digits", "1")
    assert status["learning"]["on"] is False and "drops" in status and status["rss_mb"] > 0
    code, body = _http(port, "GET", "/nope")
    assert code == 404 and "/health, /status or POST /infer" in body["error"]
    code, body = _http(port, "POST", "/status", b"{}")
    assert code == 404 and "POST /infer" in body["error"]
    # a body over the limit is refused from its Content-Length, before a byte of it is read
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode()
        )
        answer = sock.makefile("rb").read()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"413", head
    assert f"at most {MAX_BODY_BYTES} bytes" in json.loads(payload)["error"]
    code, body = _http(port, "POST", "/infer", b"")
    assert code == 400 and "send a JSON body" in body["error"]
    code, _ = _http(port, "GET", "/health")
    assert code == 200  # the server still answers


# --------------------------------------------------------------------------------- deploy
def _tampered_tar(artifact: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for file in sorted(artifact.iterdir()):
            data = file.read_bytes()
            if file.name == "model.onnx":
                data = data[:-10] + bytes(b ^ 0xFF for b in data[-10:])
            info = tarfile.TarInfo(f"a/{file.name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_deploy_rollback_and_a_corrupted_artifact_is_refused(
    mosquitto, fleet, agents, key_file, artifacts, tmp_path, digits
):
    agent = agents(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifacts[0])))
    assert fleet.wait_for(online("pi-01"))
    # a corrupted artifact, correctly signed and with the SHA-256 the command names
    data = _tampered_tar(artifacts[1])
    digest = hashlib.sha256(data).hexdigest()
    keys = Keyring.from_file(key_file)
    frame = seal_binary(
        "artifact",
        {"name": "digits", "version": "9", "sha256": digest},
        data,
        sender="laptop",
        keyring=keys,
    )
    topic = Topics(FLEET).artifact("digits", "9")
    for i, chunk in enumerate(split_chunks(frame, sender="laptop", keyring=keys)):
        fleet.transport.publish_and_wait(f"{topic}/{i}", chunk, retain=True)
    reply = fleet.command("pi-01", "deploy", {"name": "digits", "version": "9", "sha256": digest})
    assert not reply["ok"] and "SHA-256" in reply["error"]
    assert agent.artifact.version == "1"
    assert fleet.infer("pi-01", digits[1].x[:1])["ok"]  # the old model keeps serving
    # a wrong digest in the command is refused before anything is installed
    args = fleet.publish_artifact(artifacts[1])
    reply = fleet.command("pi-01", "deploy", {**args, "sha256": "0" * 64})
    assert not reply["ok"] and "expects" in reply["error"]
    # the real one deploys, and the fleet sees the new version
    reply = fleet.command("pi-01", "deploy", args)
    assert reply["ok"], reply
    assert fleet.wait_for(lambda d: d["pi-01"]["version"] == "2")
    assert agent.store.last_good().version == "1"
    reply = fleet.command("pi-01", "rollback")
    assert reply["ok"] and reply["result"]["version"] == "1"
    assert fleet.wait_for(lambda d: d["pi-01"]["version"] == "1")


def test_commands_status_config_and_errors(mosquitto, fleet, agents, key_file, artifacts, tmp_path):
    agent = agents(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifacts[0])))
    assert fleet.wait_for(online("pi-01"))
    status = fleet.command("pi-01", "status")
    assert status["ok"] and status["result"]["config"]["id"] == "pi-01"
    assert "drops" in status["result"]["telemetry"]
    reply = fleet.command("pi-01", "config.set", {"heartbeat_s": 0.25, "learn_peers": 3})
    assert reply["ok"], reply
    assert agent.config.heartbeat_s == 0.25 and agent.config.learning.peers == 3
    assert agent.store.config_overrides() == {"heartbeat_s": 0.25, "learn_peers": 3}
    for args, message in (
        ({"broker": "mqtt://x:1"}, "cannot change broker"),
        ({"heartbeat_s": -1}, "heartbeat_s must be > 0"),
        ({"learn_merge": "median"}, "merge must be"),
    ):
        reply = fleet.command("pi-01", "config.set", args)
        assert not reply["ok"] and message in reply["error"], reply
    assert fleet.command("pi-01", "reboot")["error"].startswith("unknown command")
    assert "no last-good" in fleet.command("pi-01", "rollback")["error"]
    assert "data_dir" in fleet.command("pi-01", "learn.start")["error"]
    telemetry_seen = fleet.wait_for(lambda _d: fleet.telemetry("pi-01") is not None, timeout=5)
    assert telemetry_seen
    body = fleet.telemetry("pi-01")
    assert body["rss_mb"] > 0 and body["model"] == "digits" and "p95" in body["latency_ms"]


def test_command_table_answers_every_command_and_names_the_known_ones():
    def fails(args):
        raise CommandError("cannot do that")

    def buggy(args):
        raise KeyError("oops")

    handlers = {name: Handler(lambda args, name=name: {"ran": name, **args}) for name in COMMANDS}
    handlers[Command.DEPLOY] = Handler(fails, slow=True)
    handlers[Command.ROLLBACK] = Handler(buggy)
    table = CommandTable(handlers)
    assert table.run(CommandRequest("1", "pi", "ping", {"a": 1})) == {
        "id": "1",
        "name": "ping",
        "ok": True,
        "result": {"ran": "ping", "a": 1},
    }
    unknown = table.run(CommandRequest("2", "pi", "reboot", {}))
    assert unknown == {
        "id": "2",
        "name": "reboot",
        "ok": False,
        "error": "unknown command 'reboot'; known: ping, status, deploy, rollback, "
        "learn.start, learn.stop, config.set, logs, history, metrics",
    }
    assert table.run(CommandRequest("3", "pi", "deploy", {}))["error"] == "cannot do that"
    bug = table.run(CommandRequest("4", "pi", "rollback", {}))
    assert not bug["ok"] and bug["error"].startswith("internal error: KeyError")
    assert table.is_slow("deploy") and not table.is_slow("ping") and not table.is_slow("reboot")
    assert table.names == COMMANDS
    with pytest.raises(ValueError, match="no handler for \\['ping'\\]"):
        CommandTable({k: v for k, v in handlers.items() if k != "ping"})
    with pytest.raises(ValueError, match="unknown \\['reboot'\\]"):
        CommandTable({**handlers, "reboot": Handler(fails)})


def test_bad_commands_are_answered_and_misaddressed_ones_dropped(
    mosquitto, fleet, agents, key_file, artifacts, tmp_path, transports
):
    agent = agents(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifacts[0])))
    assert fleet.wait_for(online("pi-01"))
    topics, keys = Topics(FLEET), Keyring.from_file(key_file)
    replies: queue.Queue[bytes] = queue.Queue()
    watcher = transports(mosquitto.url)
    watcher.subscribe(topics.reply("pi-01"), lambda _t, payload: replies.put(payload))
    watcher.connect(timeout=10)
    assert watcher.wait_subscribed(10)

    def send(body: dict) -> None:
        frame = seal_json(FrameKind.CMD, body, sender="laptop", keyring=keys)
        fleet.transport.publish_and_wait(topics.cmd("pi-01"), frame)

    send({"id": "x1", "target": "pi-01", "name": "ping", "args": [1]})
    reply = parse_reply(FrameVerifier(keys).open(replies.get(timeout=10)).json)
    assert reply.id == "x1" and not reply.ok and "args of 'ping'" in reply.error
    before = agent.drop_counts()
    send({"id": "x2", "target": "pi-02", "name": "ping"})  # sealed for another device
    send({"id": "x3", "name": "ping"})  # for no device at all
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        agent.drop_counts().get("misaddressed", 0) <= before.get("misaddressed", 0)
        or agent.drop_counts().get("bad_request", 0) <= before.get("bad_request", 0)
    ):
        time.sleep(0.05)
    assert agent.drop_counts()["misaddressed"] == before.get("misaddressed", 0) + 1
    assert agent.drop_counts()["bad_request"] == before.get("bad_request", 0) + 1
    assert fleet.command("pi-01", "ping")["ok"]
    # the next reply is the ping's: x2 and x3 got none
    assert parse_reply(FrameVerifier(keys).open(replies.get(timeout=10)).json).name == Command.PING
    assert replies.empty()


def test_a_reply_too_big_for_one_packet_arrives_in_chunks(
    mosquitto, fleet, agents, key_file, artifacts, tmp_path, digits
):
    agent = agents(
        agent_config(
            mosquitto.url, key_file, tmp_path, artifact=str(artifacts[0]), chunk_bytes=1024
        )
    )
    assert fleet.wait_for(online("pi-01"))
    agent.transport.max_packet_bytes = 8192  # as a broker with small packets would need
    batch = digits[1].x[:64]
    reply = fleet.infer("pi-01", batch)  # ~25 KB of logits as JSON: ~25 chunks
    assert reply["ok"], reply
    direct = runtime.load(artifacts[0]).predict(batch)
    np.testing.assert_allclose(np.asarray(reply["result"]["logits"]), direct, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- fuzz
def test_fuzzed_frames_are_dropped_and_counted(
    mosquitto, fleet, agents, key_file, artifacts, tmp_path, digits
):
    agent = agents(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifacts[0])))
    assert fleet.wait_for(online("pi-01"))
    rng = np.random.default_rng(0)
    good = Keyring.from_file(key_file)
    evil = Keyring(b"x" * 32)
    topics = Topics(FLEET)
    valid_cmd = seal_json(
        "cmd",
        {"id": "1", "target": "pi-01", "name": "ping", "args": {}},
        sender="laptop",
        keyring=good,
    )
    sent = 0
    for i in range(2000):
        kind = i % 5
        if kind == 0:
            payload = rng.bytes(int(rng.integers(0, 300)))
        elif kind == 1:  # forged: another key
            payload = seal_json(
                "cmd",
                {"id": str(i), "target": "pi-01", "name": "deploy", "args": {}},
                sender="laptop",
                keyring=evil,
            )
        elif kind == 2:  # replay of one valid command
            payload = valid_cmd
        elif kind == 3:  # bit flips in a valid frame
            raw = bytearray(valid_cmd)
            raw[int(rng.integers(0, len(raw)))] ^= 1 << int(rng.integers(0, 8))
            payload = bytes(raw)
        else:  # well-signed gossip while not learning, or garbage tensors
            payload = seal_binary(
                "gossip", {"codec": "fp32"}, rng.bytes(64), sender="pi-02", keyring=good
            )
        topic = topics.cmd("pi-01") if i % 2 else topics.gossip("pi-01")
        fleet.transport.publish(topic, payload, qos=0)
        sent += 1
    fleet.transport.publish_and_wait(topics.cmd("pi-01"), b"{}", qos=1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sum(agent.drop_counts().values()) < sent * 0.9:
        time.sleep(0.1)
    drops = agent.drop_counts()
    assert drops["forged"] > 0 and drops["malformed"] > 0 and drops["replayed"] > 0
    assert sum(drops.values()) >= sent * 0.9  # QoS 0 may lose a few on loopback; none crash
    assert fleet.infer("pi-01", digits[1].x[:2])["ok"]
    assert fleet.command("pi-01", "ping")["ok"]


# ------------------------------------------------------------------------------ learning
def _write_shards(tmp_path: Path, digits, nodes: int) -> list[Path]:
    train, test = digits
    dirs = []
    for node, index in enumerate(partition("shards:2", train.y, nodes, seed=0)):
        folder = tmp_path / f"data{node}"
        folder.mkdir()
        save_file({"x": train.x[index], "y": train.y[index]}, str(folder / "train.safetensors"))
        save_file({"x": test.x, "y": test.y}, str(folder / "test.safetensors"))
        dirs.append(folder)
    return dirs


def _learning_agents(
    agents, url: str, key_file: Path, artifact: Path, tmp_path: Path, digits, count: int, **kw
) -> list[Agent]:
    """``count`` agents pi-00, pi-01, ... serving ``artifact``, each with a non-IID shard."""
    data = _write_shards(tmp_path, digits, count)
    return [
        agents(
            agent_config(
                url,
                key_file,
                tmp_path / f"s{i}",
                id=f"pi-0{i}",
                artifact=str(artifact),
                data_dir=str(data[i]),
                **kw,
            )
        )
        for i in range(count)
    ]


@pytest.mark.slow
def test_four_agents_gossip_learn_and_every_accuracy_rises(
    mosquitto, fleet, agents, key_file, artifacts, tmp_path, digits
):
    learning = LearnSettings(
        peers=2, trigger=1, local_steps=10, lr=0.05, rounds=12, round_interval_s=0.2
    )
    fleet_agents = _learning_agents(
        agents, mosquitto.url, key_file, artifacts[0], tmp_path, digits, 4, learning=learning
    )
    assert fleet.wait_for(lambda d: all(online(f"pi-0{i}")(d) for i in range(4)))
    for i in range(4):
        assert fleet.command(f"pi-0{i}", "learn.start")["ok"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(a.learning for a in fleet_agents):
        time.sleep(0.2)
    for agent in fleet_agents:
        learner = agent.learner
        assert learner.round == 12
        assert learner.merges > 0, "no peer model was ever merged"
        assert learner.metrics["accuracy"] > learner.initial_accuracy + 0.2, (
            agent.config.id,
            learner.initial_accuracy,
            learner.metrics,
        )
    assert all(a.drop_counts().get("forged", 0) == 0 for a in fleet_agents)


def test_many_chunk_pushes_arrive_and_a_finished_run_is_announced(
    mosquitto, fleet, agents, key_file, artifacts, tmp_path, digits
):
    """4 KiB chunks: each push is ~120 chunks to 2 peers, beyond the 100-message queue.

    The push is flow-controlled, so nothing is dropped; when the run reaches its rounds, the
    retained state says ``learning: false`` so that peers stop sending models.
    """
    learning = LearnSettings(peers=2, trigger=1, local_steps=2, rounds=3, round_interval_s=0.3)
    trio = _learning_agents(
        agents,
        mosquitto.url,
        key_file,
        artifacts[0],
        tmp_path,
        digits,
        3,
        learning=learning,
        chunk_bytes=4096,
    )
    assert fleet.wait_for(lambda d: all(online(f"pi-0{i}")(d) for i in range(3)))
    for i in range(3):
        assert fleet.command(f"pi-0{i}", "learn.start")["ok"]
    assert fleet.wait_for(lambda d: all(d[f"pi-0{i}"]["learning"] for i in range(3)))
    assert fleet.wait_for(
        lambda d: not any(d[f"pi-0{i}"]["learning"] for i in range(3)), timeout=60
    ), "a run that reached its rounds still announces learning: true"
    for agent in trio:
        assert agent.learner.round == 3 and not agent.learning
        assert agent.transport.dropped_publishes == 0 and agent.push_failures == 0
        assert agent.drop_counts().get("chunk_timeout", 0) == 0
    assert sum(agent.learner.merges for agent in trio) > 0


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["sign", "int8"])
def test_two_agents_gossip_learn_a_binary_network(
    mosquitto, fleet, agents, key_file, bireal, tmp_path, digits, transports, codec
):
    """Bi-Real on the device: lossy codecs, latent weights averaged without rescaling."""
    _, artifact = bireal
    learning = LearnSettings(
        peers=1,
        trigger=1,
        local_steps=5,
        lr=0.05,
        rounds=3,
        round_interval_s=0.3,
        codec=codec,
        rescale_binary=False,
    )
    topics, keys = Topics(FLEET), Keyring.from_file(key_file)
    seen: queue.Queue[bytes] = queue.Queue()
    watcher = transports(mosquitto.url)
    watcher.subscribe(topics.gossip("pi-00"), lambda _t, payload: seen.put(payload))
    watcher.connect(timeout=10)
    assert watcher.wait_subscribed(10)
    pair = _learning_agents(
        agents, mosquitto.url, key_file, artifact, tmp_path, digits, 2, learning=learning
    )
    assert fleet.wait_for(lambda d: online("pi-00")(d) and online("pi-01")(d))
    for agent in pair:
        assert fleet.command(agent.config.id, "learn.start")["ok"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(a.learning for a in pair):
        time.sleep(0.2)
    for agent in pair:
        learner = agent.learner
        assert learner.settings.codec == codec and learner.settings.rescale_binary is False
        assert learner.round == 3 and learner.merges > 0, (agent.config.id, learner.metrics)
        assert learner.metrics["accuracy"] != learner.initial_accuracy, learner.metrics
        assert agent.learning_loop.error is None
        drops = agent.drop_counts()
        assert drops.get("malformed", 0) == drops.get("bad_tensor", 0) == 0, drops
    # what travelled to pi-00 was pi-01's model in the codec asked for
    verifier = FrameVerifier(keys)
    frame = None
    while frame is None:
        frame = verifier.receive(seen.get(timeout=10))
    assert frame.type == "gossip" and frame.sender == "pi-01"
    assert frame.header["codec"] == codec and frame.header["model"] == "bireal18"
    tensors = decode(frame.body)
    assert set(tensors) == set(pair[1].learner.state())
    fp32_bytes = sum(v.nbytes for v in pair[1].learner.state().values())
    assert len(frame.body) < (0.12 if codec == "sign" else 0.35) * fp32_bytes
    # rescale_binary false: a merge averages the binary layers' latent weights (sign() ignores
    # their scale) and variance-corrects only the real-valued ones; pi-00 no longer learns, so
    # no late push lands in its buffer
    learner, own, theirs = pair[0].learner, pair[0].learner.state(), pair[1].learner.state()
    learner.receive("pi-01", theirs, 1.0)
    assert learner.merge()
    merged = learner.state()
    assert learner.binary_names
    for name in learner.binary_names:  # self weight 0.5, one peer
        plain = 0.5 * own[name] + 0.5 * theirs[name]
        np.testing.assert_allclose(merged[name], plain, rtol=1e-5, atol=1e-6, err_msg=name)
    stem = "stem.0.weight"  # a real-valued conv
    assert stem not in learner.binary_names
    assert not np.allclose(merged[stem], 0.5 * own[stem] + 0.5 * theirs[stem], atol=1e-6)


def test_learn_stop_stops_learning_and_says_so(
    mosquitto, fleet, agents, key_file, artifacts, tmp_path, digits
):
    learning = LearnSettings(local_steps=2, rounds=0, round_interval_s=0.05)
    (agent,) = _learning_agents(
        agents, mosquitto.url, key_file, artifacts[0], tmp_path, digits, 1, learning=learning
    )
    agent_id = agent.config.id
    assert fleet.wait_for(online(agent_id))
    assert fleet.command(agent_id, "learn.start")["ok"]
    assert fleet.wait_for(lambda d: d[agent_id]["learning"] is True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and agent.learner.round < 2:
        time.sleep(0.05)
    reply = fleet.command(agent_id, "learn.stop")
    assert reply["ok"], reply
    assert reply["result"]["stopped"] is True and reply["result"]["round"] >= 2
    assert not agent.learning
    assert fleet.wait_for(lambda d: d[agent_id]["learning"] is False)
    status = fleet.command(agent_id, "status")["result"]
    assert status["learning"] is False and status["telemetry"]["learning"]["on"] is False
    stopped_at = reply["result"]["round"]
    time.sleep(0.5)  # a dozen rounds' time: none runs
    assert agent.learner.round == stopped_at
    assert status["telemetry"]["learning"]["round"] == stopped_at
    again = fleet.command(agent_id, "learn.stop")
    assert again["ok"] and again["result"] == {"stopped": False, "round": stopped_at}
    rounds = fleet.command(agent_id, "metrics")["result"]["rounds"]
    # the starting point, then one entry per round, each with the accuracy the learner measured
    assert [r["round"] for r in rounds] == list(range(stopped_at + 1))
    assert (
        rounds[0]["train_loss"] is None and rounds[0]["accuracy"] == agent.learner.initial_accuracy
    )
    assert rounds[-1]["accuracy"] == agent.learner.metrics["accuracy"]
    assert all(isinstance(r["train_loss"], float) for r in rounds[1:])


def test_history_and_logs_commands(mosquitto, fleet, agents, key_file, artifacts, tmp_path, caplog):
    caplog.set_level(logging.INFO)  # the daemon lets INFO through; a test process must ask
    config = agent_config(mosquitto.url, key_file, tmp_path / "s", artifact=str(artifacts[0]))
    agent = agents(config)
    assert fleet.wait_for(online("pi-01"))
    assert fleet.command("pi-01", "deploy", fleet.publish_artifact(artifacts[1]))["ok"]
    assert fleet.command("pi-01", "rollback")["ok"]
    history = fleet.command("pi-01", "history")["result"]
    assert [(e["event"], e["version"]) for e in history["events"]] == [
        ("initial", "1"),
        ("deploy", "2"),
        ("rollback", "1"),
    ]
    assert history["active"]["version"] == "1" and history["last_good"]["version"] == "2"
    status = fleet.command("pi-01", "status")["result"]
    assert status["manifest"]["input"]["shape"][-3:] == [1, 32, 32]

    lines = fleet.command("pi-01", "logs", {"lines": 1000})["result"]["lines"]
    assert any("INFO bitfleet.agent: serving digits 2" in line for line in lines), lines
    assert len(fleet.command("pi-01", "logs", {"lines": 2})["result"]["lines"]) == 2
    for bad in (0, 1001, "5", True):
        reply = fleet.command("pi-01", "logs", {"lines": bad})
        assert not reply["ok"] and "lines must be an integer, 1 to 1000" in reply["error"]

    agent.shutdown()  # the history lives in the state directory: a restarted agent has it
    agents(config)
    assert fleet.wait_for(online("pi-01"))
    again = fleet.command("pi-01", "history")["result"]["events"]
    assert [e["event"] for e in again] == ["initial", "deploy", "rollback"]


def test_fleet_client_refuses_a_batch_over_one_packet(mosquitto, fleet):
    with pytest.raises(ValueError, match="send at most 18[0-9] per call"):
        fleet.infer("pi-01", np.zeros((500, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="empty"):
        fleet.infer("pi-01", np.zeros((0, 1, 32, 32), np.float32))


@pytest.mark.slow
def test_broker_restart_mid_learning(mosquitto, key_file, artifacts, agents, tmp_path, digits):
    learning = LearnSettings(peers=1, local_steps=5, rounds=0, round_interval_s=0.1)
    pair = _learning_agents(
        agents,
        mosquitto.url,
        key_file,
        artifacts[0],
        tmp_path,
        digits,
        2,
        learn=True,
        learning=learning,
    )
    deadline = time.monotonic() + 30
    while (
        time.monotonic() < deadline and min(a.learner.merges if a.learner else 0 for a in pair) < 2
    ):
        time.sleep(0.1)
    before = [a.learner.round for a in pair]
    mosquitto.restart()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and min(a.transport.connect_count for a in pair) < 2:
        time.sleep(0.1)
    assert all(a.transport.connect_count >= 2 for a in pair)
    merges = [a.learner.merges for a in pair]
    with FleetClient(mosquitto.url, fleet=FLEET, key_file=key_file) as client:
        # the broker lost its retained messages: the agents announced themselves again
        assert client.wait_for(lambda d: online("pi-00")(d) and online("pi-01")(d))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        a.learner.merges <= m for a, m in zip(pair, merges, strict=True)
    ):
        time.sleep(0.1)
    assert all(a.learner.round > r for a, r in zip(pair, before, strict=True))
    assert all(a.learner.merges > m for a, m in zip(pair, merges, strict=True))


# --------------------------------------------------------------------- the real daemon
def _spawn(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_daemon_sigkill_last_will_then_resume_from_checkpoint(
    mosquitto, fleet, key_file, artifacts, tmp_path, digits
):
    data = _write_shards(tmp_path, digits, 1)[0]
    state = tmp_path / "state"
    args = daemon_args(
        mosquitto.url,
        key_file,
        state,
        "--artifact",
        str(artifacts[0]),
        "--learn",
        "--data-dir",
        str(data),
    )
    env = {"BITFLEET_LEARN_ROUND_INTERVAL_S": "0.05", "BITFLEET_LEARN_LOCAL_STEPS": "3"}
    process = _spawn(args, env)
    try:
        assert fleet.wait_for(online("pi-09"), timeout=60)
        deadline = time.monotonic() + 60
        meta = state / "learning" / "meta.json"
        while time.monotonic() < deadline and (
            not meta.exists() or json.loads(meta.read_text())["round"] < 3
        ):
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        assert fleet.wait_for(lambda d: d["pi-09"]["status"] == "offline", timeout=10)
        assert fleet.devices()["pi-09"]["model"] == "digits"  # the will names the model
        checkpoint = StateStore(state).load_checkpoint()
        assert checkpoint is not None
        saved_weights, saved_meta = checkpoint
        saved = saved_meta["round"]
        assert saved >= 3
    finally:
        process.kill()
    # Restarted so that no new round can finish before we look (a 60 s round interval) and a
    # round barely moves the weights (lr 1e-9): what the device reports and saves next is
    # what it resumed from, not a fresh start that caught up quickly.
    slow = {
        "BITFLEET_LEARN_ROUND_INTERVAL_S": "60",
        "BITFLEET_LEARN_LOCAL_STEPS": "1",
        "BITFLEET_LEARN_LR": "1e-9",
    }
    process = _spawn(args, slow)
    try:
        assert fleet.wait_for(online("pi-09"), timeout=60)
        deadline = time.monotonic() + 60
        learning = {"round": None}
        while time.monotonic() < deadline and learning["round"] is None:
            reply = fleet.command("pi-09", "status", timeout=30)
            learning = reply["result"]["telemetry"]["learning"]
            time.sleep(0.2)
        assert learning["on"] is True
        assert learning["round"] == saved  # resumed at the saved round, not from zero
        assert learning["accuracy"] == saved_meta["metrics"]["accuracy"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert fleet.wait_for(lambda d: d["pi-09"]["status"] == "offline", timeout=10)
        checkpoint = StateStore(state).load_checkpoint()
        assert checkpoint is not None
        weights, meta_after = checkpoint
    finally:
        process.kill()
    # SIGTERM finished the round in progress and saved it: one round on from the saved one,
    # with the saved weights (a fresh initialisation would differ by far more than 1e-9 steps)
    assert meta_after["round"] == saved + 1
    assert set(weights) == set(saved_weights)
    for name, value in saved_weights.items():
        np.testing.assert_allclose(weights[name], value, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_daemon_serving_only_never_loads_torch_and_stops_cleanly(
    mosquitto, fleet, key_file, artifacts, tmp_path
):
    process = _spawn(
        daemon_args(mosquitto.url, key_file, tmp_path / "state", "--artifact", str(artifacts[0]))
    )
    try:
        assert fleet.wait_for(online("pi-09"), timeout=60)
        telemetry = fleet.command("pi-09", "status", timeout=30)["result"]["telemetry"]
        assert telemetry["torch_loaded"] is False and telemetry["learning"]["on"] is False
        from exporters import kernels

        assert telemetry["kernels_isa"] == kernels.backend() != kernels.NUMPY_BACKEND
        # the CLI exec'd a fresh interpreter under the same PID: its parser's libraries are gone
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        assert "pydantic_core" not in maps and "onnxruntime" in maps
        assert b"edge_agent.daemon" in Path(f"/proc/{process.pid}/cmdline").read_bytes()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert fleet.wait_for(lambda d: d["pi-09"]["status"] == "offline", timeout=10)
    finally:
        process.kill()


def _python_m(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from this checkout, to completion."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_daemon_module_alone_and_a_bad_log_level_are_one_clear_line(key_file, tmp_path):
    alone = _python_m("edge_agent.daemon")
    assert alone.returncode == 1
    assert alone.stderr.strip().splitlines() == [
        "error: usage: python -m edge_agent.daemon --config-fd N (started by bitfleet-agent "
        "run; run that instead)"
    ]
    args = daemon_args(
        "mqtt://127.0.0.1:1", key_file, tmp_path / "s", "--artifact", str(tmp_path / "none")
    )
    bad = _python_m("edge_agent.cli", "run", *args, "--log-level", "loud")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "error: unknown log level 'loud'; use one of debug, info, warning, error"
    ]


def test_daemon_bad_input_is_one_clear_line(key_file, tmp_path):
    done = _python_m(
        "edge_agent.cli", "run", "--state-dir", str(tmp_path), "--key-file", str(key_file)
    )
    assert done.returncode == 1 and done.stderr.strip() == (
        "error: no device id: pass --id DEVICE (or set id in the config file)"
    )
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    common = ("edge_agent.cli", "run", "--id", "pi", "--state-dir", str(tmp_path))
    done = _python_m(*common, "--key-file", str(short))
    assert done.returncode == 1 and "head -c 32 /dev/urandom" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = _python_m(*common, "--key-file", str(key_file), "--artifact", str(tmp_path / "nope"))
    assert done.returncode == 1 and done.stderr.startswith("error: artifact ")
    assert "does not exist" in done.stderr and len(done.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------- config
def test_config_precedence_file_env_flags(tmp_path):
    file = tmp_path / "agent.toml"
    file.write_text('id = "from-file"\nheartbeat_s = 3\nfleet = "f"\n[learn]\npeers = 4\n')
    config = load_config(
        file,
        environ={
            "BITFLEET_HEARTBEAT_S": "5",
            "BITFLEET_ISA": "scalar",
            "BITFLEET_LEARN_LR": "0.2",
        },
        flags={"fleet": "flag", "id": None},
    )
    assert (config.id, config.heartbeat_s, config.fleet) == ("from-file", 5.0, "flag")
    assert config.learning.peers == 4 and config.learning.lr == 0.2
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        load_config(None, flags={"colour": "red"})
    with pytest.raises(ConfigError, match="heartbeat_s must be a number"):
        load_config(None, environ={"BITFLEET_HEARTBEAT_S": "soon"})
    shipped = load_config(ROOT / "ops" / "agent.toml", environ={})
    assert shipped.id == "pi-01" and shipped.check() is shipped


def test_unreachable_broker_is_a_clear_error(key_file, artifacts, tmp_path):
    config = agent_config(
        f"mqtt://127.0.0.1:{free_port()}", key_file, tmp_path, artifact=str(artifacts[0])
    )
    agent = Agent(config)
    with pytest.raises(Exception, match="127.0.0.1"):
        agent.start(connect_timeout=1)
    agent.shutdown()


def test_fleet_client_times_out_clearly(mosquitto, fleet):
    with pytest.raises(FleetError, match="did not answer 'ping'"):
        fleet.command("nobody", "ping", timeout=0.5)


def test_latency_quantiles_match_numpy():
    from edge_agent.telemetry import quantile

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 1000):
        values = sorted(rng.random(n).tolist())
        for q in (0.5, 0.95):
            assert quantile(values, q) == pytest.approx(np.percentile(values, q * 100))
    assert quantile([], 0.5) is None


def test_learn_settings_take_rescale_binary_from_commands_and_files():
    assert LearnSettings().rescale_binary is True
    assert LearnSettings().updated({"rescale_binary": False}).rescale_binary is False
    assert LearnSettings().updated({"rescale_binary": "false"}).rescale_binary is False
    with pytest.raises(ConfigError, match="rescale_binary"):
        LearnSettings().updated({"rescale_binary": "perhaps"})


def test_learn_settings_take_the_vc_rule():
    assert LearnSettings().vc_rule == "bitfleet"
    assert LearnSettings().updated({"vc_rule": "dfl2"}).vc_rule == "dfl2"
    with pytest.raises(ConfigError, match="learn vc_rule must be one of bitfleet, dfl2"):
        LearnSettings().updated({"vc_rule": "dfl3"})
