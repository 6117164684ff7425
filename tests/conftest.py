"""Shared fixtures: real MQTT brokers on free loopback ports, and transports cleaned up after."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_support import FLEET

from edge_agent.broker import EmbeddedBroker, MosquittoBroker, mosquitto_available

_ids = itertools.count()


def pytest_sessionstart(session: pytest.Session) -> None:
    """A real broker is part of the suite: without Mosquitto the run fails, it never skips."""
    if not mosquitto_available():
        raise pytest.UsageError(
            "the tests need Mosquitto (on PATH, or in /usr/sbin): "
            "apt-get install mosquitto mosquitto-clients"
        )


@pytest.fixture
def mosquitto() -> Iterator[MosquittoBroker]:
    """A fresh anonymous Mosquitto (about 20 ms to start)."""
    with MosquittoBroker() as broker:
        yield broker


@pytest.fixture
def amqtt_broker() -> Iterator[EmbeddedBroker]:
    """A fresh embedded amqtt broker in a child process (about 0.25 s to start)."""
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest) -> MosquittoBroker | EmbeddedBroker:
    """Each test that takes it runs once on Mosquitto and once on amqtt."""
    return request.getfixturevalue("mosquitto" if request.param == "mosquitto" else "amqtt_broker")


@pytest.fixture
def no_user_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No BITFLEET_* variable of the user's, and fleet.toml in the test's own (empty) folder.

    Returns that fleet.toml's path (not written). The fleet CLI tests use it on every test:
    ``pytestmark = pytest.mark.usefixtures("no_user_settings")``.
    """
    for name in list(os.environ):
        if name.startswith("BITFLEET_"):
            monkeypatch.delenv(name)
    config = tmp_path / "config" / "fleet.toml"
    monkeypatch.setattr("toolkit.fleet_settings.config_path", lambda: config)
    return config


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fleet's HMAC key (64 bytes), one per test module."""
    path = tmp_path_factory.mktemp("keys") / "fleet.key"
    path.write_bytes(bytes(range(32)) * 2)
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeNet-5 artifact for 32x32 digits (name digits, version 1), portable flavour."""
    import exporters
    import models

    root = tmp_path_factory.mktemp("art")
    model = models.create("lenet5").eval()
    return exporters.export(
        model, root / "v1", "onnx-portable", name="digits", version="1", input_shape=(1, 32, 32)
    )


@pytest.fixture
def fleet(mosquitto: MosquittoBroker, key_file: Path) -> Iterator[object]:
    """The laptop's real client on the test's Mosquitto."""
    from toolkit.fleet import FleetClient

    with FleetClient(mosquitto.url, fleet=FLEET, key_file=key_file) as client:
        yield client


@pytest.fixture
def agents() -> Iterator[Callable[..., object]]:
    """Start in-process agents (fast reconnects, subscriptions in place); all shut down after."""
    from edge_agent.agent import Agent

    made: list[Agent] = []

    def start(config: object) -> Agent:
        agent = Agent(config)  # type: ignore[arg-type]
        agent.transport._client.reconnect_delay_set(0.05, 0.5)
        agent.start(connect_timeout=10)
        made.append(agent)
        assert agent.transport.wait_subscribed(10)  # requests sent from now on reach it
        return agent

    yield start
    for agent in made:
        agent.shutdown()


@pytest.fixture
def transports() -> Iterator[Callable[..., object]]:
    """Factory of MqttTransport with fast reconnects; every one is closed after the test."""
    from edge_agent.transport import MqttTransport

    made: list[MqttTransport] = []

    def make(url: str, client_id: str | None = None, **kwargs: object) -> MqttTransport:
        kwargs.setdefault("reconnect_min_s", 0.05)
        kwargs.setdefault("reconnect_max_s", 0.25)
        transport = MqttTransport(url=url, client_id=client_id or f"t{next(_ids)}", **kwargs)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()
