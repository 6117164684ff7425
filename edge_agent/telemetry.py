"""What a device tells the fleet about itself: presence, telemetry, drop counters.

:class:`Presence` owns ``dev/<id>/state``: the retained ``online`` state it re-publishes after
every (re)connect and model change, the ``offline`` last will (re-sealed each time, so it names
the serving model), the clean ``offline`` at shutdown, and the table of peers' states read from
``dev/+/state``, from which learning peers are chosen. It also watches its own state topic for
a second agent started with the same device id (see :meth:`Presence.on_state`).

:class:`TelemetryReporter` builds the telemetry document (CPU, RSS, temperature where the OS
exposes it, model, inference latency p50/p95, learning, drop counters), publishes it every
``heartbeat_s`` on ``dev/<id>/telemetry`` and keeps the drop counters in the state directory,
so they survive restarts.
"""

from __future__ import annotations

import logging
import platform
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bitfleet
from bitfleet.errors import BitfleetError
from edge_agent.context import AgentContext
from edge_agent.learning import LearningLoop
from edge_agent.protocol import (
    MISADDRESSED,
    OFFLINE,
    ONLINE,
    DropCounter,
    FrameKind,
    FrameRejected,
    ProtocolError,
    expect_json,
    state_body,
    state_online,
)
from edge_agent.serving import ModelServer

__all__ = ["Presence", "TelemetryReporter", "quantile"]

log = logging.getLogger("bitfleet.agent")

_THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")


class Presence:
    """The retained state of this device, and every peer's.

    A state published under another device's topic is counted in the context's ``drops`` as
    ``misaddressed``.

    Every state this process publishes carries, besides :func:`edge_agent.protocol.state_body`'s
    fields, ``instance`` (random, one per process) and ``since`` (when the process started).
    The broker lets one client per id connect: a second agent started with the same device id
    takes the connection, the first reconnects and takes it back, and so on. Each takeover shows
    on this device's own state topic as a state (or a last will) of another instance; once
    this process has seen its own state come back, and for states sealed after it started (so
    a state left by an earlier run of this device never counts), :meth:`on_state` hands such a
    state to ``on_duplicate(body)``.

    Args:
        ctx: the agent's shared pieces.
        server: the model being served, named in the state.
        learning: whether this device learns now.
        on_duplicate: called (on the MQTT thread) with the state body of another agent using
            this device's id.
    """

    def __init__(
        self,
        ctx: AgentContext,
        server: ModelServer,
        learning: Callable[[], bool],
        on_duplicate: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.server = server
        self._learning = learning
        self._on_duplicate = on_duplicate
        self._lock = threading.Lock()
        self.peers: dict[str, dict[str, Any]] = {}
        self.instance: str = secrets.token_hex(8)
        self.since: float = time.time()
        self._seen_own = False  # our own state came back from the broker at least once

    def body(self, status: str) -> dict[str, Any]:
        """The state document: ``status`` plus model, versions, capabilities, learning."""
        ref = self.server.artifact
        spec = self.server.spec()
        body = state_body(
            status,
            model=ref.name if ref else None,
            version=ref.version if ref else None,
            sha256=ref.sha256 if ref else None,
            agent_version=bitfleet.version(),
            learning=self._learning(),
            model_spec=spec.get("name") if spec else None,
            platform=platform.machine(),
            instance=self.instance,
            since=self.since,
        )
        return body

    def _frame(self, status: str) -> bytes:
        return self.ctx.seal(FrameKind.STATE, self.body(status))

    @property
    def _topic(self) -> str:
        return self.ctx.topics.state(self.ctx.device)

    def set_will(self) -> None:
        """Seal the ``offline`` last will the broker gets with the next connect."""
        self.ctx.transport.set_will(self._topic, self._frame(OFFLINE))

    def announce(self) -> None:
        """Re-publish the retained online state (after every (re)connect and model change).

        The last will for the next reconnect is re-sealed too, so it names the serving model.
        """
        self.set_will()
        self.ctx.transport.publish(self._topic, self._frame(ONLINE), qos=1, retain=True)

    def go_offline(self, timeout: float) -> None:
        """Publish the retained offline state and wait for the broker's acknowledgement.

        Raises :class:`~edge_agent.transport.TransportError` if it does not come.
        """
        self.ctx.transport.publish_and_wait(
            self._topic, self._frame(OFFLINE), qos=1, retain=True, timeout=timeout
        )

    def on_state(self, topic: str, payload: bytes) -> None:
        """MQTT handler of ``dev/+/state``: remember each peer's latest state.

        This device's own topic is watched for another agent with the same id instead.
        """
        parsed = self.ctx.topics.parse(topic)
        if parsed is None or not payload:
            return
        if parsed[0] == self.ctx.device:
            self._on_own_state(payload)
            return
        try:
            frame = self.ctx.verifier.open(payload, retained=True)
        except FrameRejected:
            return  # the verifier counted it
        try:
            body = expect_json(frame, FrameKind.STATE)
        except ProtocolError:
            body = None
        if body is None or frame.sender != parsed[0]:
            self.ctx.drops.count(MISADDRESSED)
            return
        with self._lock:  # latest arrival wins (a last will carries its connect time)
            self.peers[frame.sender] = {"ts": frame.ts, **body}

    def _on_own_state(self, payload: bytes) -> None:
        try:
            frame = self.ctx.verifier.open(payload, retained=True)
            body = expect_json(frame, FrameKind.STATE)
        except FrameRejected:
            return  # the verifier counted it
        except ProtocolError:
            self.ctx.drops.count(MISADDRESSED)
            return
        if frame.sender != self.ctx.device:
            self.ctx.drops.count(MISADDRESSED)
            return
        if body.get("instance") == self.instance:
            self._seen_own = True
            return
        # a state of another process signed as this device: an earlier run's (retained, or its
        # last will), which arrives before our own and was sealed before we started; or a
        # second agent's, which keeps coming after ours
        if self._seen_own and frame.ts >= self.since and self._on_duplicate is not None:
            self._on_duplicate(body)

    def online_peers(self, learning_only: bool = False) -> list[str]:
        """The peers whose latest state is online (and learning, with ``learning_only``)."""
        with self._lock:
            return sorted(
                device
                for device, body in self.peers.items()
                if state_online(body, learning=learning_only)
            )


class TelemetryReporter:
    """The telemetry document, the heartbeat that publishes it, and the saved drop counters.

    The drop counts add up the verifier's counter, the agent's own and those saved in the
    state directory by earlier runs.

    Args:
        ctx: the agent's shared pieces (``heartbeat_s`` is read at every beat).
        server: the model being served (its latencies).
        learning: the learning loop (its status).
    """

    def __init__(self, ctx: AgentContext, server: ModelServer, learning: LearningLoop) -> None:
        self.ctx = ctx
        self.server = server
        self.learning = learning
        self._drops: tuple[DropCounter, ...] = (ctx.verifier.drops, ctx.drops)
        self._base_counters = ctx.store.counters()
        self._started = time.time()

    def drop_counts(self) -> dict[str, int]:
        """Every frame dropped, by reason, since the state directory was created."""
        counts = dict(self._base_counters)
        for counter in self._drops:
            for reason, n in counter.snapshot().items():
                counts[reason] = counts.get(reason, 0) + n
        return counts

    def document(self) -> dict[str, Any]:
        """The telemetry document published every heartbeat."""
        import psutil

        process = psutil.Process()
        latencies = sorted(self.server.latencies)
        ref = self.server.artifact
        return {
            "ts": time.time(),
            "uptime_s": time.time() - self._started,
            "cpu_percent": process.cpu_percent(interval=None),
            "rss_mb": process.memory_info().rss / 2**20,
            "temperature_c": _temperature(),
            "model": ref.name if ref else None,
            "version": ref.version if ref else None,
            "latency_ms": {
                "p50": quantile(latencies, 0.50),
                "p95": quantile(latencies, 0.95),
                "count": len(latencies),
            },
            "learning": self.learning.status(),
            "drops": self.drop_counts(),
            "connects": self.ctx.transport.connect_count,
            "torch_loaded": "torch" in sys.modules,
            "kernels_isa": _kernels_isa(),
        }

    def beat(self) -> None:
        """Publish one telemetry document (skipped while offline) and save the counters."""
        ctx = self.ctx
        if not ctx.transport.connected:
            return  # telemetry is QoS 0 and only worth anything fresh: skip it
        frame = ctx.seal(FrameKind.TELEMETRY, self.document())
        ctx.transport.publish(ctx.topics.telemetry(ctx.device), frame, qos=0)
        self.save_counters()

    def run(self, stopping: threading.Event) -> None:
        """Beat every ``heartbeat_s`` until ``stopping`` is set (the heartbeat thread)."""
        while not stopping.wait(self.ctx.config.heartbeat_s):
            try:
                self.beat()
            except BitfleetError as err:
                log.warning("heartbeat skipped: %s", err)
            except Exception:  # noqa: BLE001 - a bug in one beat must not end the heartbeat
                log.exception("heartbeat failed")

    def save_counters(self) -> None:
        """Keep the drop counters in the state directory (a warning if it cannot)."""
        try:
            self.ctx.store.save_counters(self.drop_counts())
        except OSError as err:
            log.warning("cannot save counters: %s", err)


def _kernels_isa() -> str:
    """The instruction set of the binary kernels here (``avx512``, ``neon_dotprod``, ...).

    ``numpy`` where the native library was not built; imported on first use, so a device that
    serves the portable flavour loads the 100 KB library only when telemetry is asked for.
    """
    from exporters import kernels

    return kernels.backend()


def quantile(ordered: list[float], q: float) -> float | None:
    """Linear-interpolated quantile of sorted values, as ``np.percentile``'s default.

    Plain Python on purpose: the first ``np.percentile`` call pulls in ~2 MB of numpy code,
    2.5% of a serving agent's memory budget.
    """
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def _temperature() -> float | None:
    """CPU temperature in Celsius where the OS exposes it (Raspberry Pi, Jetson, most Linux)."""
    try:
        return int(_THERMAL_ZONE.read_text().strip()) / 1000.0
    except (OSError, ValueError):
        return None
