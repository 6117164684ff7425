"""Helpers shared by the agent test modules (fixtures that use them live in conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.protocol import ONLINE, FrameKind, seal_json, state_body

FLEET = "lab"


def agent_config(broker_url: str, key_file: Path, state: Path, **kw: Any) -> AgentConfig:
    """An agent on ``broker_url`` with a fast heartbeat, an ephemeral HTTP port and ``kw``."""
    base: dict[str, Any] = dict(
        broker=broker_url,
        fleet=FLEET,
        id=kw.pop("id", "pi-01"),
        state_dir=str(state),
        key_file=str(key_file),
        http_port=0,
        heartbeat_s=0.5,
    )
    base.update(kw)
    return AgentConfig(**base)


def online(device: str) -> Callable[[dict[str, Any]], bool]:
    """A ``FleetClient.wait_for`` predicate: ``device``'s retained state says online."""
    return lambda devices: devices.get(device, {}).get("status") == "online"


def daemon_args(
    url: str, key_file: Path, state: Path, *extra: str, device: str = "pi-09"
) -> list[str]:
    """``bitfleet-agent run`` flags of a test daemon: HTTP on any free port, 0.5 s heartbeat."""
    return [
        "--broker",
        url,
        "--fleet",
        FLEET,
        "--id",
        device,
        "--state-dir",
        str(state),
        "--key-file",
        str(key_file),
        "--http-port",
        "0",
        "--heartbeat-s",
        "0.5",
        *extra,
    ]


def ghost(fleet: Any, device: str = "pi-09") -> str:
    """A signed, retained ``online`` state of ``device``; no agent serves it: it never answers.

    ``fleet`` is a connected :class:`toolkit.fleet.FleetClient` (the ``fleet`` fixture).
    """
    body = state_body(
        ONLINE,
        model="digits",
        version="1",
        sha256=None,
        agent_version="0",
        learning=False,
        model_spec=None,
        platform="test",
        instance="ghost",
        since=time.time(),
    )
    frame = seal_json(FrameKind.STATE, body, sender=device, keyring=fleet.keyring)
    fleet.transport.publish_and_wait(fleet.topics.state(device), frame, qos=1, retain=True)
    return device
