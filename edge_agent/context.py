"""What every part of one agent shares: settings, state directory, keys, topics, connection.

:class:`edge_agent.agent.Agent` builds one :class:`AgentContext` and hands it to each of its
parts (serving, commands, artifacts, learning, telemetry), so none of them builds its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.protocol import DropCounter, FrameVerifier, Keyring, Topics, seal_json
from edge_agent.state import StateStore
from edge_agent.transport import MqttTransport

__all__ = ["AgentContext"]


@dataclass(frozen=True)
class AgentContext:
    """The shared pieces of one agent.

    Attributes:
        config: the settings (``config.set`` changes some of them while the agent runs).
        store: the state directory.
        keyring: keys to sign and verify frames with.
        topics: the fleet's topic names.
        transport: the MQTT connection.
        verifier: opens frames from the network; it counts its own drops.
        drops: the agent's drops that the verifier does not see (wrong type, misaddressed...).
    """

    config: AgentConfig
    store: StateStore
    keyring: Keyring
    topics: Topics
    transport: MqttTransport
    verifier: FrameVerifier
    drops: DropCounter

    @property
    def device(self) -> str:
        """The id of this device, the sender of everything it seals."""
        return self.config.id

    def seal(self, kind: str, body: Mapping[str, Any]) -> bytes:
        """A JSON frame of ``kind`` from this device, signed."""
        return seal_json(kind, body, sender=self.device, keyring=self.keyring)
