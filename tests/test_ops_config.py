"""The shipped ops files: the Mosquitto ACL run for real, mosquitto.conf, agent.toml, systemd."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.broker import MosquittoBroker, free_port, write_password_file
from edge_agent.transport import TransportError, parse_broker_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPS = Path(__file__).resolve().parents[1] / "ops"
ACL = OPS / "mosquitto" / "bitfleet.acl"
PASSWORDS = {"pi-01": "pw-pi-01", "pi-02": "pw-pi-02", "laptop": "pw-laptop"}


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.items.append((topic, payload))

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _ in self.items]

    def wait_for(self, item: tuple[str, bytes], timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if item in self.items:
                    return True
            time.sleep(0.01)
        return False


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory):
    passwd = write_password_file(tmp_path_factory.mktemp("auth") / "passwd", PASSWORDS)
    with MosquittoBroker(password_file=passwd, acl_file=ACL) as broker:
        yield broker


@pytest.fixture
def login(acl_broker, transports):
    """Connect as one of PASSWORDS' users (client id == user name unless given)."""

    def connect(user: str, subscribe: dict | None = None, **kwargs):
        kwargs.setdefault("client_id", user)
        t = transports(acl_broker.url, username=user, password=PASSWORDS[user], **kwargs)
        for topic_filter, handler in (subscribe or {}).items():
            t.subscribe(topic_filter, handler)
        t.connect(timeout=3)
        assert t.wait_subscribed(3)
        return t

    return connect


def test_device_may_publish_its_own_topics_and_gossip_but_not_commands(login):
    seen = Inbox()
    login("laptop", {"bitfleet/#": seen})
    pi01 = login("pi-01")
    allowed = [
        "bitfleet/demo/dev/pi-01/state",
        "bitfleet/demo/dev/pi-01/telemetry",
        "bitfleet/demo/dev/pi-01/reply",
        "bitfleet/demo/dev/pi-02/gossip",
    ]
    forbidden = [
        "bitfleet/demo/dev/pi-02/cmd",
        "bitfleet/demo/dev/pi-01/cmd",  # not even its own: commands come from operators
        "bitfleet/demo/dev/pi-02/infer",
        "bitfleet/demo/dev/pi-02/state",
        "bitfleet/demo/dev/pi-02/telemetry",
        "bitfleet/demo/artifacts/m/1/manifest",
    ]
    for topic in forbidden[:1] + allowed + forbidden[1:]:
        # MQTT 3.1.1: a denied publish is dropped silently, the PUBACK still comes back
        pi01.publish_and_wait(topic, b"x")
    marker = ("bitfleet/demo/dev/pi-01/state", b"end")
    pi01.publish_and_wait(*marker)
    # one publisher, one subscriber: delivery is in order, so once the marker is in,
    # anything forbidden would have arrived already
    assert seen.wait_for(marker)
    assert seen.topics() == allowed + [marker[0]]
    assert pi01.connected and pi01.connect_count == 1  # denied publishes do not disconnect


def test_device_reads_its_own_inbox_and_peer_states_only(login):
    inbox01, inbox02 = Inbox(), Inbox()
    pi01 = login("pi-01", {"bitfleet/demo/#": inbox01})  # asks for everything, gets its share
    login("pi-02", {"bitfleet/demo/#": inbox02})
    laptop = login("laptop")
    laptop.publish_and_wait("bitfleet/demo/dev/pi-02/cmd", b"for pi-02")
    laptop.publish_and_wait("bitfleet/demo/dev/pi-02/telemetry", b"pi-02 telemetry")
    laptop.publish_and_wait("bitfleet/demo/dev/pi-02/state", b"pi-02 online")
    laptop.publish_and_wait("bitfleet/demo/artifacts/m/1/manifest", b"manifest")
    laptop.publish_and_wait("bitfleet/demo/dev/pi-01/cmd", b"for pi-01")
    assert inbox01.wait_for(("bitfleet/demo/dev/pi-01/cmd", b"for pi-01"))
    assert inbox01.items == [
        ("bitfleet/demo/dev/pi-02/state", b"pi-02 online"),
        ("bitfleet/demo/artifacts/m/1/manifest", b"manifest"),
        ("bitfleet/demo/dev/pi-01/cmd", b"for pi-01"),
    ]
    assert inbox02.wait_for(("bitfleet/demo/dev/pi-02/cmd", b"for pi-02"))
    assert "bitfleet/demo/dev/pi-01/cmd" not in inbox02.topics()
    # and a device replies on its own reply topic, which the laptop reads
    replies = Inbox()
    laptop.subscribe("bitfleet/demo/dev/+/reply", replies)
    assert laptop.wait_subscribed(3)
    pi01.publish_and_wait("bitfleet/demo/dev/pi-01/reply", b'{"id": 1}')
    assert replies.wait_for(("bitfleet/demo/dev/pi-01/reply", b'{"id": 1}'))


def test_mqtt5_device_is_told_when_a_publish_is_denied(login):
    pi01 = login("pi-01", protocol="5", client_id="pi-01-v5")
    with pytest.raises(TransportError, match="refused the publish to .*pi-02/cmd: Not authorized"):
        pi01.publish_and_wait("bitfleet/demo/dev/pi-02/cmd", b"x")
    pi01.publish_and_wait("bitfleet/demo/dev/pi-01/state", b"fine")
    assert pi01.refused_publishes == 1


def test_anonymous_and_unknown_users_are_refused(acl_broker, transports):
    for kwargs in ({}, {"username": "pi-99", "password": "guess"}):
        t = transports(acl_broker.url, **kwargs)
        with pytest.raises(TransportError, match="Not authorized"):
            t.connect(timeout=3)


def test_shipped_mosquitto_conf_starts(tmp_path, transports):
    passwd = write_password_file(tmp_path / "passwd", {"laptop": "pw"})
    port = free_port()
    text = (OPS / "mosquitto" / "mosquitto.conf").read_text()
    for old, new in [
        ("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1"),
        ("/etc/mosquitto/bitfleet.passwd", str(passwd)),
        ("/etc/mosquitto/bitfleet.acl", str(ACL)),
        ("/var/lib/mosquitto/", f"{tmp_path}/"),
        ("log_dest syslog", "log_dest stderr"),
    ]:
        assert old in text
        text = text.replace(old, new)
    if os.geteuid() == 0:
        text += "\nuser root\n"
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    try:
        t = transports(f"mqtt://127.0.0.1:{port}", username="laptop", password="pw")
        deadline = time.monotonic() + 5
        while not _listening(port):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "mosquitto did not listen within 5 s"
            time.sleep(0.02)
        t.connect(timeout=3)
        t.publish_and_wait("bitfleet/demo/dev/pi-01/cmd", b"x")
        assert t.broker_max_packet is None  # MQTT 3.1.1: the limit is not announced
    finally:
        proc.terminate()
        proc.communicate(timeout=5)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# -- static checks of the example config and the unit --------------------------------------------

AGENT_KEYS = {
    "broker": str,
    "fleet": str,
    "id": str,
    "state_dir": str,
    "artifact": str,
    "key_file": str,
    "device_keys_dir": str,
    "username": str,
    "password": str,
    "ca_file": str,
    "cert_file": str,
    "client_key_file": str,
    "protocol": str,
    "heartbeat_s": int,
    "chunk_bytes": int,
    "http_port": int,
    "data_dir": str,
    "learn": bool,
    "threads": int,
}


def test_agent_toml_has_exactly_the_documented_keys():
    config = tomllib.loads((OPS / "agent.toml").read_text())
    assert set(config) == set(AGENT_KEYS)
    # ... which are exactly the settings the agent's loader knows (learning ones aside)
    from dataclasses import fields

    from edge_agent.config import AgentConfig

    assert set(AGENT_KEYS) == {f.name for f in fields(AgentConfig)} - {"learning"}
    for key, kind in AGENT_KEYS.items():
        assert type(config[key]) is kind, key
    assert parse_broker_url(config["broker"]) == ("127.0.0.1", 1883, False)
    assert config["protocol"] in ("3.1.1", "5")
    assert (config["fleet"], config["id"]) == ("demo", "pi-01")
    assert config["state_dir"] == "/var/lib/bitfleet"
    assert config["heartbeat_s"] == 10 and config["threads"] == 1 and config["learn"] is False
    assert config["chunk_bytes"] == 262144 < 1_000_000  # below MqttTransport.max_packet_bytes
    assert config["http_port"] == 8765


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd unit as section -> key -> values (keys such as Environment= repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {raw!r}"
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit():
    unit = _unit(OPS / "bitfleet-agent.service")
    service = unit["Service"]
    assert service["Type"] == ["simple"]
    assert service["ExecStart"] == [
        "/opt/bitfleet/venv/bin/bitfleet-agent run --config /etc/bitfleet/agent.toml"
    ]
    assert service["User"] == ["bitfleet"] and service["Group"] == ["bitfleet"]
    assert service["Restart"] == ["on-failure"] and service["RestartSec"] == ["5"]
    assert service["KillSignal"] == ["SIGTERM"] and service["TimeoutStopSec"] == ["30"]
    assert service["StateDirectory"] == ["bitfleet"]
    for key, value in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ReadWritePaths", "/var/lib/bitfleet"),
    ]:
        assert service[key] == [value], key
    # torch's oneDNN JIT (on-device learning) needs writable+executable memory
    assert "MemoryDenyWriteExecute" not in service
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
