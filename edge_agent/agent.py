"""The edge agent: serve the deployed model, obey the fleet's commands, gossip-learn.

One :class:`Agent` wraps one MQTT client (:class:`edge_agent.transport.MqttTransport`) and the
device's state directory (:class:`edge_agent.state.StateStore`), and wires the parts that do the
work, one job each:

- :mod:`edge_agent.serving`: the model being served; the one path that loads, health-checks
  and swaps in an artifact (start-up, ``deploy``, ``rollback``); inference.
- :mod:`edge_agent.commands`: the table from each protocol command to its handler, and the
  dispatch of command and inference frames (slow commands on a worker thread).
- :mod:`edge_agent.artifacts`: downloading, checking and installing an artifact for ``deploy``.
- :mod:`edge_agent.learning`: the learning thread, model pushes, gossip receipt.
- :mod:`edge_agent.telemetry`: presence (retained state, last will, peers), the telemetry
  document, the heartbeat and the drop counters.

What an agent does, topic by topic (:class:`edge_agent.protocol.Topics`; every frame is signed
and checked by :class:`edge_agent.protocol.FrameVerifier`, and every dropped frame is counted by
reason and reported in telemetry):

- ``dev/<id>/state`` (retained): ``{"status": "online", model, version, agent_version,
  capabilities, learning, instance, since}``, re-published on every (re)connect; the last will
  and a clean shutdown set ``"status": "offline"``. A state of another ``instance`` on this
  topic means a second agent runs with this device's id: the one started later stops, with an
  error, rather than take the connection from the other again and again.
- ``dev/<id>/telemetry``: every ``heartbeat_s``: CPU, RSS, temperature where the OS exposes it,
  model version, inference latency p50/p95, learning round and accuracy, drop counters.
- ``dev/<id>/infer``: inference requests (:func:`edge_agent.protocol.infer_body`), answered on
  ``dev/<id>/reply``. The same runs on ``http://127.0.0.1:<http_port>/infer`` for apps on the
  device (:mod:`edge_agent.http`).
- ``dev/<id>/cmd``: commands (:func:`edge_agent.protocol.command_body`, a name of
  :data:`edge_agent.protocol.COMMANDS`), answered on ``dev/<id>/reply``
  (:func:`edge_agent.protocol.reply_body`).
- ``dev/<id>/gossip``: peers' models while learning (see :mod:`edge_agent.learner`).
- ``dev/+/state``: every device's presence, from which learning peers are chosen.
- ``artifacts/<name>/<version>/#``: retained chunks of an artifact, read during a deploy.

The serving path imports no torch; :mod:`edge_agent.learner` (and torch with it) is imported
the first time learning starts.
"""

from __future__ import annotations

import functools
import logging
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitfleet.errors import BitfleetError
from edge_agent.artifacts import ArtifactDownloads
from edge_agent.commands import (
    CommandError,
    CommandTable,
    Handler,
    RequestDispatcher,
    Worker,
    answer_ping,
    config_set,
)
from edge_agent.config import AgentConfig, ConfigError, apply
from edge_agent.context import AgentContext
from edge_agent.learning import LearningLoop, check_local_data
from edge_agent.logbuffer import CAPACITY, LogBuffer
from edge_agent.protocol import (
    ONLINE,
    Command,
    DropCounter,
    FrameVerifier,
    Keyring,
    Topics,
    parse_deploy_args,
)
from edge_agent.serving import ModelServer
from edge_agent.state import ArtifactRef, StateStore
from edge_agent.telemetry import Presence, TelemetryReporter
from edge_agent.transport import MqttTransport, TransportError
from exporters import runtime

if TYPE_CHECKING:
    from edge_agent.learner import Learner

__all__ = ["Agent", "DuplicateIdError", "load_keyring"]

log = logging.getLogger("bitfleet.agent")

_OFFLINE_TIMEOUT_S = 5.0  # how long shutdown waits for the broker to take the offline state
_JOIN_TIMEOUT_S = 5.0
_LOG_LINES = 100  # lines the logs command returns by default
_MAX_DUPLICATES = 5  # another agent's states seen before even the first agent gives up


class DuplicateIdError(BitfleetError):
    """Another agent is connected with this device's id; this one stopped rather than fight."""


class Agent:
    """One device's daemon. ``start()``, then ``wait()`` (or ``run()`` for both plus signals)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config: AgentConfig = config.check()
        # what can fail comes before the state directory is created, so that a failed start
        # leaves none behind (start() removes it again if it created it and then fails)
        self.keyring: Keyring = load_keyring(config)
        self.topics: Topics = Topics(config.fleet)
        self.verifier: FrameVerifier = FrameVerifier(self.keyring)
        self.drops: DropCounter = DropCounter()  # agent-level reasons; the verifier counts its own
        self.stopping: threading.Event = threading.Event()
        self.transport: MqttTransport = _transport(config)
        self._made_state: Path | None = _first_missing(Path(config.state_dir).expanduser())
        self.store: StateStore = StateStore(config.state_dir)
        apply(self.config, self.store.config_overrides(), "the state directory's config.json")
        #: Why this agent stopped by itself: another agent uses its device id (else None).
        self.conflict: str | None = None
        self._duplicates = 0
        self._done = False
        ctx = AgentContext(
            self.config,
            self.store,
            self.keyring,
            self.topics,
            self.transport,
            self.verifier,
            self.drops,
        )
        self.serving: ModelServer = ModelServer(self.config, self.store, self.drops)
        self.presence: Presence = Presence(
            ctx, self.serving, learning=lambda: self.learning, on_duplicate=self._on_duplicate
        )
        self.learning_loop: LearningLoop = LearningLoop(
            ctx,
            spec=self.serving.spec,
            start_point=self.serving.learning_start,
            peers=self.presence.online_peers,
            announce=self.presence.announce,
            stopping=self.stopping,
        )
        self.reporter: TelemetryReporter = TelemetryReporter(ctx, self.serving, self.learning_loop)
        self.artifacts: ArtifactDownloads = ArtifactDownloads(ctx)
        self.worker: Worker = Worker()
        self.commands: CommandTable = CommandTable(
            {
                Command.PING: Handler(answer_ping),
                Command.STATUS: Handler(self._status),
                Command.DEPLOY: Handler(self._deploy, slow=True),
                Command.ROLLBACK: Handler(self._rollback, slow=True),
                Command.LEARN_START: Handler(self.start_learning, slow=True),
                Command.LEARN_STOP: Handler(self.learning_loop.stop_command),
                Command.CONFIG_SET: Handler(functools.partial(config_set, ctx)),
                Command.LOGS: Handler(self._logs),
                Command.HISTORY: Handler(self._history),
                Command.METRICS: Handler(self._metrics),
            }
        )
        self.log_buffer: LogBuffer = LogBuffer()
        self.requests: RequestDispatcher = RequestDispatcher(
            ctx, self.commands, self.serving.infer, self.worker
        )
        self.http: ThreadingHTTPServer | None = None
        self._heartbeat: threading.Thread | None = None

    # ------------------------------------------------------------------------------ lifecycle
    def start(self, connect_timeout: float | None = 30.0) -> None:
        """Load the model, connect, subscribe, and start the worker and heartbeat threads.

        A start that fails (with ``learn`` on but no usable ``data_dir``, an artifact that does
        not load, a port in use, a broker not reached within ``connect_timeout``) raises, after
        stopping what it started and removing the state directory if this run created it.
        ``connect_timeout=None`` returns without waiting for the broker: the connection is then
        made in the background, retried with backoff until the broker answers.
        """
        try:
            self._start(connect_timeout)
        except BaseException:
            self._abort()
            raise

    def _start(self, connect_timeout: float | None) -> None:
        self.log_buffer.attach()
        if self.config.learn:  # before anything runs: learning would fail later, on its thread
            check_local_data(self.config.data_dir)
        self.serving.start(self.config.artifact or None)
        self.presence.set_will()
        t, me = self.topics, self.config.id
        self.transport.subscribe(t.cmd(me), self.requests.on_command)
        self.transport.subscribe(t.infer(me), self.requests.on_infer)
        self.transport.subscribe(t.gossip(me), self._on_gossip)
        self.transport.subscribe(t.all_states(), self.presence.on_state)
        self.transport.add_connect_hook(self.presence.announce)
        self.worker.start()
        self._heartbeat = threading.Thread(
            target=self.reporter.run, args=(self.stopping,), name="bitfleet-heartbeat", daemon=True
        )
        self._heartbeat.start()
        if self.config.http_port:
            from edge_agent.http import start_http_server

            self.http = start_http_server(self, self.config.http_port)
        self.transport.connect(timeout=connect_timeout)
        if self.config.learn:
            self.worker.submit(lambda: self.start_learning({}))
        fleet, url = self.config.fleet, self.transport.url
        if self.transport.connected:
            log.info("agent %s serving in fleet %s via %s", me, fleet, url)
        else:
            low, high = self.transport.reconnect_delays
            log.info(
                "agent %s serving in fleet %s; connecting to broker %s in the background "
                "(retrying every %g s, backing off to every %g s, until it answers)",
                me,
                fleet,
                url,
                low,
                high,
            )

    def run(self) -> int:
        """Start, then serve until SIGTERM/SIGINT; shut down cleanly. Returns the exit code.

        Raises :class:`DuplicateIdError` after shutting down when another agent uses this
        device's id (see :meth:`_on_duplicate`).
        """
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self.start(connect_timeout=None)
        self.wait()
        if self.conflict is None:
            log.info("agent %s stopping: finish the round, checkpoint, go offline", self.config.id)
        self.shutdown()
        if self.conflict is not None:
            raise DuplicateIdError(self.conflict)
        log.info("agent %s stopped", self.config.id)
        return 0

    def wait(self, timeout: float | None = None) -> bool:
        return self.stopping.wait(timeout)

    def shutdown(self) -> None:
        """Finish the current learning round, checkpoint, publish offline, disconnect.

        Stopped because another agent uses this device's id, it leaves the retained state to
        that agent rather than publishing offline. Calling it again does nothing.
        """
        if self._done:
            return
        self._done = True
        self.stopping.set()
        self.stop_learning(wait=True)
        self.worker.stop(timeout=_JOIN_TIMEOUT_S)
        self._stop_http()
        if self.transport.connected and self.conflict is None:
            try:
                self.presence.go_offline(timeout=_OFFLINE_TIMEOUT_S)
            except TransportError as err:  # the broker may be gone; the last will covers it
                log.warning("could not publish offline state: %s", err)
        self.transport.close(clean=True)
        self.reporter.save_counters()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=_JOIN_TIMEOUT_S)
        self.log_buffer.detach()

    def _abort(self) -> None:
        """Undo a failed start: stop what started, remove the state directory if it is new."""
        self._done = True
        self.stopping.set()
        self.worker.stop(timeout=_JOIN_TIMEOUT_S)
        self._stop_http()
        self.transport.close(clean=True)
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=_JOIN_TIMEOUT_S)
        self._remove_made_state()
        self.log_buffer.detach()

    def _stop_http(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None

    def _remove_made_state(self) -> None:
        if self._made_state is not None:
            shutil.rmtree(self._made_state, ignore_errors=True)
            self._made_state = None

    def _on_duplicate(self, other: Mapping[str, Any]) -> None:
        """Another agent publishes this device's state: two agents share one id (MQTT thread).

        A broker such as Mosquitto lets one client per id connect, so each connect of one
        disconnects the other, and both would keep reconnecting for ever. The agent that
        started later stops (``conflict`` says why; :meth:`run` raises it as
        :class:`DuplicateIdError`); the one that was there first warns once, announces itself
        again so that the later one sees a fresh state (behind two bridged brokers both stay
        connected, so no reconnect would do it), and serves on. If
        the duplicates keep coming (clocks that disagree, or an agent that does not check), it
        stops too.
        """
        self._duplicates += 1
        me, url = self.config.id, self.transport.url
        instance = str(other.get("instance") or "unknown")
        value = other.get("since")
        since = (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )
        first = since is not None and (since, instance) < (
            self.presence.since,
            self.presence.instance,
        )
        if first or self._duplicates >= _MAX_DUPLICATES:
            if self.conflict is not None:
                return
            started = f"started {_when(since)}" if since is not None else "start time unknown"
            self.conflict = (
                f"another agent with device id {me!r} is connected to {url} (instance "
                f"{instance}, {started}; this one started {_when(self.presence.since)}): the "
                "broker lets one client per id connect, so each would keep disconnecting the "
                "other. This one stops; give every agent its own --id"
            )
            log.error(
                "another agent with device id %r (instance %s) is connected to %s: stopping",
                me,
                instance,
                url,
            )
            self.stopping.set()
        elif self._duplicates == 1:
            log.warning(
                "another agent with device id %r started later (instance %s) and takes over "
                "this agent's connection to %s; it stops once it notices, this one serves on",
                me,
                instance,
                url,
            )
            # make sure it notices: on one broker the takeover makes this agent reconnect and
            # re-announce, but behind two bridged brokers both stay connected
            self.presence.announce()

    # -------------------------------------------------------------------------------- serving
    @property
    def predictor(self) -> runtime.Predictor | None:
        """The loaded model, or ``None`` before the first deploy."""
        return self.serving.predictor

    @property
    def artifact(self) -> ArtifactRef | None:
        """The artifact being served, or ``None`` before the first deploy."""
        return self.serving.artifact

    def infer(self, inputs: Any) -> dict[str, Any]:
        """Logits and top-1 class for a JSON batch; a ``ValueError`` (one line) for a bad one."""
        return self.serving.infer(inputs)

    # ------------------------------------------------------------------------------- commands
    def _status(self, args: Mapping[str, Any]) -> dict[str, Any]:
        last_good = self.store.last_good()
        return {
            **self.presence.body(ONLINE),
            "config": self.config.public(),
            "telemetry": self.telemetry(),
            "peers": self.online_peers(),
            "last_good": last_good.to_dict() if last_good else None,
            "manifest": self.serving.model_card(),
        }

    def _logs(self, args: Mapping[str, Any]) -> dict[str, Any]:
        count = args.get("lines", _LOG_LINES)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= CAPACITY:
            raise CommandError(f"logs: lines must be an integer, 1 to {CAPACITY}, not {count!r}")
        return {"lines": self.log_buffer.lines(count)}

    def _history(self, args: Mapping[str, Any]) -> dict[str, Any]:
        active, last_good = self.store.active(), self.store.last_good()
        return {
            "active": active.to_dict() if active else None,
            "last_good": last_good.to_dict() if last_good else None,
            "events": self.store.history(),
        }

    def _metrics(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {"learning": self.learning_loop.status(), "rounds": list(self.learning_loop.rounds)}

    def _deploy(self, args: Mapping[str, Any]) -> dict[str, Any]:
        ref = self.artifacts.download(parse_deploy_args(args))
        self.serving.activate(ref)
        self.presence.announce()
        return ref.to_dict()

    def _rollback(self, args: Mapping[str, Any]) -> dict[str, Any]:
        previous = self.serving.rollback()
        self.presence.announce()
        return previous.to_dict()

    # ------------------------------------------------------------------------------- learning
    @property
    def learning(self) -> bool:
        """Learning is on: the thread runs and nobody asked it to stop (it may finish a round)."""
        return self.learning_loop.on

    @property
    def learner(self) -> Learner | None:
        """The learner of the current (or last) learning run."""
        return self.learning_loop.learner

    @property
    def push_failures(self) -> int:
        """Gossip pushes not acknowledged in time (broker gone, timeout)."""
        return self.learning_loop.push_failures

    def start_learning(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Build the learner (importing torch) and start the learning thread."""
        return self.learning_loop.start(overrides)

    def stop_learning(self, wait: bool = True) -> None:
        self.learning_loop.stop(wait=wait)

    def _on_gossip(self, topic: str, payload: bytes) -> None:
        self.learning_loop.on_gossip(topic, payload)

    # ------------------------------------------------------------------------------ telemetry
    def online_peers(self, learning_only: bool = False) -> list[str]:
        return self.presence.online_peers(learning_only)

    def drop_counts(self) -> dict[str, int]:
        return self.reporter.drop_counts()

    def telemetry(self) -> dict[str, Any]:
        return self.reporter.document()


def load_keyring(config: AgentConfig) -> Keyring:
    """The fleet key, plus per-device keys from ``device_keys_dir`` (``<device>.key`` files).

    With per-device keys a device signs with its own key and verifies each peer with that
    peer's key, so a device that leaks its key lets an attacker impersonate it alone.
    """
    try:
        return Keyring.from_files(config.key_file, config.device_keys_dir or None)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot use the keys ({err})") from None


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (None: it exists)."""
    missing = None
    for candidate in (path.absolute(), *path.absolute().parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _transport(config: AgentConfig) -> MqttTransport:
    """The agent's MQTT client; :class:`ConfigError` for settings it refuses."""
    try:
        return MqttTransport(
            url=config.broker,
            client_id=config.id,
            username=config.username or None,
            password=config.password or None,
            ca_file=config.ca_file or None,
            cert_file=config.cert_file or None,
            key_file=config.client_key_file or None,
            protocol=config.protocol,
        )
    except ValueError as err:
        raise ConfigError(f"cannot use the broker settings: {err}") from None
