"""The edge agent: serve the deployed model, obey the fleet's commands, gossip-learn.

One :class:`Agent` wraps one MQTT client (:class:`edge_agent.transport.MqttTransport`) and the
device's state directory (:class:`edge_agent.state.StateStore`). What it does, topic by topic
(:class:`edge_agent.protocol.Topics`, all frames signed and checked by
:class:`edge_agent.protocol.FrameVerifier`; every dropped frame is counted by reason and
reported in telemetry):

- ``dev/<id>/state`` (retained): ``{"status": "online", model, version, agent_version,
  capabilities, learning}``, re-published on every (re)connect; the last will and a clean
  shutdown set ``"status": "offline"``.
- ``dev/<id>/telemetry``: every ``heartbeat_s``: CPU, RSS, temperature where the OS exposes it,
  model version, inference latency p50/p95, learning round and accuracy, drop counters.
- ``dev/<id>/infer``: inference requests ``{"id", "inputs": N x C x H x W nested lists}``,
  answered on ``dev/<id>/reply``. The same runs on ``http://127.0.0.1:<http_port>/infer``
  for apps on the device (:mod:`edge_agent.http`).
- ``dev/<id>/cmd``: ``{"id", "target", "name", "args"}`` with ``name`` one of :data:`COMMANDS`,
  answered on ``dev/<id>/reply`` with ``{"id", "name", "ok", "result" | "error"}``.
- ``dev/<id>/gossip``: peers' models while learning (see :mod:`edge_agent.learner`).
- ``dev/+/state``: every device's presence, from which learning peers are chosen.
- ``artifacts/<name>/<version>/#``: retained chunks of an artifact, read during a deploy.

The serving path imports no torch; :mod:`edge_agent.learner` (and torch with it) is imported
the first time learning starts.
"""

from __future__ import annotations

import base64
import collections
import logging
import platform
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import bitfleet
from bitfleet.errors import BitfleetError
from edge_agent.config import RUNTIME_KEYS, AgentConfig, ConfigError, apply
from edge_agent.protocol import (
    DropCounter,
    Frame,
    FrameRejected,
    FrameVerifier,
    Keyring,
    Reassembler,
    Topics,
    seal_json,
    seal_tensors,
    split_chunks,
)
from edge_agent.state import StateError, StateStore
from edge_agent.transport import MqttTransport, TransportError
from exporters import runtime
from exporters.artifact import ArtifactError

__all__ = ["Agent", "COMMANDS"]

log = logging.getLogger("bitfleet.agent")

COMMANDS = ("ping", "status", "deploy", "rollback", "learn.start", "learn.stop", "config.set")
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024


class CommandError(BitfleetError):
    """A command that cannot be carried out; its message becomes the reply's ``error``."""


class Agent:
    """One device's daemon. ``start()``, then ``wait()`` (or ``run()`` for both plus signals)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config.check()
        self.store = StateStore(config.state_dir)
        apply(self.config, self.store.config_overrides(), "the state directory's config.json")
        self.keyring = load_keyring(config)
        self.topics = Topics(config.fleet)
        self.verifier = FrameVerifier(self.keyring)
        self.drops = DropCounter()  # agent-level reasons; the verifier counts its own
        self._base_counters = self.store.counters()
        self.stopping = threading.Event()
        self._predictor_lock = threading.Lock()
        self.predictor: runtime.Predictor | None = None
        self.artifact = None
        self.latencies: collections.deque[float] = collections.deque(maxlen=1000)
        self.peers: dict[str, dict[str, Any]] = {}
        self._peers_lock = threading.Lock()
        self.learner: Any = None
        self._learn_thread: threading.Thread | None = None
        self._learn_stop = threading.Event()
        self._learn_error: str | None = None
        self.push_failures = 0  # gossip pushes not acknowledged in time (broker gone, timeout)
        self._work: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._artifact_inbox: dict[str, queue.Queue[Frame]] = {}
        self._started = time.time()
        self._threads: list[threading.Thread] = []
        self.http = None
        self.transport = MqttTransport(
            url=config.broker,
            client_id=config.id,
            username=config.username or None,
            password=config.password or None,
            ca_file=config.ca_file or None,
            cert_file=config.cert_file or None,
            key_file=config.client_key_file or None,
            protocol=config.protocol,
            will=(self.topics.state(config.id), self._state_frame("offline"), 1, True),
        )

    # ------------------------------------------------------------------------------ lifecycle
    def start(self, connect_timeout: float | None = 30.0) -> None:
        """Load the model, connect, subscribe, and start the worker and heartbeat threads."""
        self._load_initial_artifact()
        self.transport.set_will(self.topics.state(self.config.id), self._state_frame("offline"))
        t = self.topics
        me = self.config.id
        self.transport.subscribe(t.cmd(me), self._on_cmd)
        self.transport.subscribe(t.infer(me), self._on_infer)
        self.transport.subscribe(t.gossip(me), self._on_gossip)
        self.transport.subscribe(t.all_states(), self._on_state)
        self.transport.add_connect_hook(self._announce)
        self._spawn(self._worker, "bitfleet-worker")
        self._spawn(self._heartbeat, "bitfleet-heartbeat")
        if self.config.http_port:
            from edge_agent.http import start_http_server

            self.http = start_http_server(self, self.config.http_port)
        self.transport.connect(timeout=connect_timeout)
        if self.config.learn:
            self._work.put(lambda: self.start_learning({}))
        log.info("agent %s serving in fleet %s via %s", me, self.config.fleet, self.config.broker)

    def run(self) -> int:
        """Start, then serve until SIGTERM/SIGINT; shut down cleanly. Returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self.start(connect_timeout=None)
        self.wait()
        log.info("agent %s stopping: finish the round, checkpoint, go offline", self.config.id)
        self.shutdown()
        log.info("agent %s stopped", self.config.id)
        return 0

    def wait(self, timeout: float | None = None) -> bool:
        return self.stopping.wait(timeout)

    def shutdown(self) -> None:
        """Finish the current learning round, checkpoint, publish offline, disconnect."""
        self.stopping.set()
        self.stop_learning(wait=True)
        self._work.put(None)
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        try:
            if self.transport.connected:
                self.transport.publish_and_wait(
                    self.topics.state(self.config.id),
                    self._state_frame("offline"),
                    qos=1,
                    retain=True,
                    timeout=5.0,
                )
        except Exception as err:  # noqa: BLE001 - the broker may be gone; the will covers it
            log.warning("could not publish offline state: %s", err)
        self.transport.close(clean=True)
        self._save_counters()
        for thread in self._threads:
            thread.join(timeout=5.0)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _worker(self) -> None:
        """Runs slow commands (deploy, learn.start) off the MQTT network thread, in order."""
        while True:
            job = self._work.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # noqa: BLE001 - a failed job must not stop the worker
                log.exception("background job failed")

    # ------------------------------------------------------------------------------ presence
    def _state_body(self, status: str) -> dict[str, Any]:
        ref = self.artifact
        return {
            "status": status,
            "model": ref.name if ref else None,
            "version": ref.version if ref else None,
            "sha256": ref.sha256 if ref else None,
            "agent_version": bitfleet.version(),
            "capabilities": ["infer", "deploy", "learn"],
            "learning": self.learning,
            "model_spec": self._spec_name(),
            "platform": platform.machine(),
        }

    def _state_frame(self, status: str) -> bytes:
        return seal_json(
            "state", self._state_body(status), sender=self.config.id, keyring=self.keyring
        )

    def _announce(self) -> None:
        """Re-publish the retained online state (after every (re)connect and model change).

        The last will for the next reconnect is re-sealed too, so it names the serving model.
        """
        self.transport.set_will(self.topics.state(self.config.id), self._state_frame("offline"))
        self.transport.publish(
            self.topics.state(self.config.id), self._state_frame("online"), qos=1, retain=True
        )

    def _on_state(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse(topic)
        if parsed is None or parsed[0] == self.config.id or not payload:
            return
        try:
            frame = self.verifier.open(payload, retained=True)
        except FrameRejected:
            return
        if frame.sender != parsed[0] or frame.type != "state":
            self.drops.count("misaddressed")
            return
        with self._peers_lock:  # latest arrival wins (a last will carries its connect time)
            self.peers[frame.sender] = {"ts": frame.ts, **frame.json}

    def online_peers(self, learning_only: bool = False) -> list[str]:
        with self._peers_lock:
            return sorted(
                device
                for device, body in self.peers.items()
                if body.get("status") == "online" and (body.get("learning") or not learning_only)
            )

    # ------------------------------------------------------------------------------- serving
    def _load_initial_artifact(self) -> None:
        ref = self.store.active()
        if ref is None and self.config.artifact:
            ref = self.store.install(self.config.artifact)
            self.store.activate(ref)
        if ref is not None:
            self._serve(ref)

    def _serve(self, ref: Any) -> None:
        predictor = runtime.load(ref.path, threads=self.config.threads)
        self._health_check(predictor)
        with self._predictor_lock:
            self.predictor, self.artifact = predictor, ref

    @staticmethod
    def _health_check(predictor: runtime.Predictor) -> None:
        probe = np.zeros((2, *predictor.input_shape), np.float32)
        logits = predictor.predict(probe)
        if logits.ndim != 2 or logits.shape[0] != 2 or not np.all(np.isfinite(logits)):
            raise ArtifactError(
                f"health check failed: the model returned {logits.shape} "
                f"{'non-finite ' if not np.all(np.isfinite(logits)) else ''}logits on a probe batch"
            )

    def infer(self, inputs: Any) -> dict[str, Any]:
        """Logits and top-1 class for a batch; ValueError (one line) for a bad batch."""
        batch = _decode_inputs(inputs)
        with self._predictor_lock:
            predictor = self.predictor
        if predictor is None:
            raise ValueError("no model is deployed on this device yet; send a deploy command")
        start = time.perf_counter()
        logits = predictor.predict(batch)
        elapsed = (time.perf_counter() - start) * 1000.0
        self.latencies.append(elapsed)
        return {
            "logits": logits.tolist(),
            "top1": logits.argmax(1).tolist(),
            "latency_ms": elapsed,
            "model": self.artifact.name if self.artifact else None,
            "version": self.artifact.version if self.artifact else None,
        }

    def _on_infer(self, topic: str, payload: bytes) -> None:
        try:
            frame = self.verifier.open(payload)
        except FrameRejected:
            return
        if frame.type != "infer" or frame.binary or not isinstance(frame.json, dict):
            self.drops.count("bad_request")
            return
        body = frame.json
        reply: dict[str, Any] = {"id": body.get("id"), "name": "infer"}
        try:
            reply.update(ok=True, result=self.infer(body.get("inputs")))
        except ValueError as err:
            reply.update(ok=False, error=str(err))
        self._reply(reply)

    def _reply(self, body: dict[str, Any]) -> None:
        frame = seal_json("reply", body, sender=self.config.id, keyring=self.keyring)
        self.transport.publish(self.topics.reply(self.config.id), frame, qos=1)

    # ------------------------------------------------------------------------------ commands
    def _on_cmd(self, topic: str, payload: bytes) -> None:
        try:
            frame = self.verifier.open(payload)
        except FrameRejected:
            return
        body = frame.json if not frame.binary else None
        if frame.type != "cmd" or not isinstance(body, dict):
            self.drops.count("bad_request")
            return
        if body.get("target") != self.config.id:
            # a command sealed for another device, replayed onto this one's topic
            self.drops.count("misaddressed")
            return
        name, args, cmd_id = body.get("name"), body.get("args") or {}, body.get("id")
        if name not in COMMANDS or not isinstance(args, dict):
            self._reply(
                {
                    "id": cmd_id,
                    "name": name,
                    "ok": False,
                    "error": f"unknown command {name!r}; known: {', '.join(COMMANDS)}",
                }
            )
            return
        handler = getattr(self, "_cmd_" + name.replace(".", "_"))
        slow = name in ("deploy", "rollback", "learn.start")

        def run() -> None:
            try:
                result = handler(args)
                self._reply({"id": cmd_id, "name": name, "ok": True, "result": result})
            except (CommandError, ConfigError, ArtifactError, StateError, ValueError) as err:
                self._reply({"id": cmd_id, "name": name, "ok": False, "error": str(err)})
            except Exception as err:  # noqa: BLE001 - report, never crash the agent
                log.exception("command %s failed", name)
                self._reply(
                    {
                        "id": cmd_id,
                        "name": name,
                        "ok": False,
                        "error": f"{type(err).__name__}: {err}",
                    }
                )

        if slow:
            self._work.put(run)
        else:
            run()

    def _cmd_ping(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {"pong": True, "ts": time.time()}

    def _cmd_status(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **self._state_body("online"),
            "config": self.config.public(),
            "telemetry": self.telemetry(),
            "peers": self.online_peers(),
            "last_good": self.store.last_good().to_dict() if self.store.last_good() else None,
        }

    def _cmd_config_set(self, args: Mapping[str, Any]) -> dict[str, Any]:
        bad = [k for k in args if k not in RUNTIME_KEYS and not k.startswith("learn_")]
        if bad:
            raise CommandError(
                f"cannot change {', '.join(sorted(bad))} at run time; changeable: "
                f"{', '.join(sorted(RUNTIME_KEYS))} and learn_* keys (restart for the others)"
            )
        trial = AgentConfig(**{**asdict(self.config), "learning": self.config.learning})
        apply(trial, args, "config.set")
        trial.check()
        apply(self.config, args, "config.set")
        self.store.save_config_overrides({**self.store.config_overrides(), **args})
        return {"applied": dict(args)}

    def _cmd_rollback(self, args: Mapping[str, Any]) -> dict[str, Any]:
        previous = self.store.rollback()
        try:
            self._serve(previous)
        except (ArtifactError, ValueError) as err:
            self.store.rollback()  # swap back: keep serving what served
            raise CommandError(
                f"the last-good artifact does not load ({err}); kept the current"
            ) from None
        self._announce()
        return previous.to_dict()

    def _cmd_deploy(self, args: Mapping[str, Any]) -> dict[str, Any]:
        name, version, digest = args.get("name"), args.get("version"), args.get("sha256")
        if not all(isinstance(v, str) and v for v in (name, version, digest)):
            raise CommandError("deploy needs string args name, version and sha256")
        timeout = float(args.get("timeout_s", 60.0))
        data = self._fetch_artifact(str(name), str(version), str(digest), timeout)
        folder = Path(tempfile.mkdtemp(prefix="deploy-", dir=self.store.root))
        try:
            tar = folder / "artifact.tar"
            tar.write_bytes(data)
            ref = self.store.install(tar)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        predictor = runtime.load(ref.path, threads=self.config.threads)
        self._health_check(predictor)
        self.store.activate(ref)
        with self._predictor_lock:
            self.predictor, self.artifact = predictor, ref
        self._announce()
        return ref.to_dict()

    def _fetch_artifact(self, name: str, version: str, digest: str, timeout: float) -> bytes:
        """Collect the retained, signed chunks of an artifact and check its SHA-256."""
        import hashlib

        topic = self.topics.artifact(name, version) + "/#"
        verifier = FrameVerifier(self.keyring, max_frame_bytes=MAX_ARTIFACT_BYTES + 65536)
        assembler = Reassembler(timeout_s=timeout, max_bytes=MAX_ARTIFACT_BYTES + 65536)
        inbox: queue.Queue[bytes] = queue.Queue()
        self.transport.subscribe(topic, lambda _t, p: inbox.put(p))
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommandError(
                        f"artifact {name} {version} did not arrive within {timeout:.0f} s "
                        "(publish it first: its chunks are retained on the artifacts topic)"
                    )
                try:
                    payload = inbox.get(timeout=min(left, 0.5))
                except queue.Empty:
                    continue
                try:
                    frame = verifier.open(payload, retained=True)
                    whole = assembler.add(frame) if frame.type == "chunk" else payload
                    if whole is None:
                        continue
                    inner = verifier.open(whole, retained=True) if whole is not payload else frame
                except FrameRejected as err:
                    self.drops.count(err.reason)
                    raise CommandError(f"artifact {name} {version} refused: {err}") from None
                if inner.type != "artifact":
                    continue
                found = hashlib.sha256(inner.body).hexdigest()
                if found != digest:
                    raise CommandError(
                        f"artifact {name} {version} has SHA-256 {found[:12]}..., the deploy "
                        f"command expects {digest[:12]}...: refused, the old model keeps serving"
                    )
                return inner.body
        finally:
            self.transport.unsubscribe(topic)

    # ------------------------------------------------------------------------------ learning
    @property
    def learning(self) -> bool:
        """Learning is on: the thread runs and nobody asked it to stop (it may finish a round)."""
        thread = self._learn_thread
        return thread is not None and thread.is_alive() and not self._learn_stop.is_set()

    def _spec(self) -> dict[str, Any] | None:
        return self.artifact and _manifest_spec(self.artifact.path)

    def _spec_name(self) -> str | None:
        spec = self._spec()
        return spec.get("name") if spec else None

    def _cmd_learn_start(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return self.start_learning(args)

    def _cmd_learn_stop(self, args: Mapping[str, Any]) -> dict[str, Any]:
        was = self.learning
        self.stop_learning(wait=True)
        self._announce()
        return {"stopped": was, "round": self.learner.round if self.learner else 0}

    def start_learning(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Build the learner (importing torch) and start the learning thread."""
        if self.learning:
            raise CommandError("learning is already on; send learn.stop first")
        if self._learn_thread is not None:
            self._learn_thread.join()  # a stopped run may still be finishing its round
        spec = self._spec()
        if spec is None:
            raise CommandError("no model with a network spec is deployed; deploy one first")
        if not self.config.data_dir:
            raise CommandError("no data_dir is configured; config.set data_dir first")
        settings = self.config.learning.updated(overrides)
        from edge_agent.learner import Learner, load_local_data

        data = load_local_data(self.config.data_dir)
        self.learner = Learner(spec, data, settings, self.store, self.config.id)
        self._learn_stop.clear()
        self._learn_error = None
        self._learn_thread = threading.Thread(
            target=self._learn_loop, name="bitfleet-learn", daemon=True
        )
        self._learn_thread.start()
        self._announce()
        return {"round": self.learner.round, "settings": asdict(settings)}

    def stop_learning(self, wait: bool = True) -> None:
        self._learn_stop.set()
        thread = self._learn_thread
        if thread is not None and wait and thread is not threading.current_thread():
            thread.join()

    def _learn_loop(self) -> None:
        learner = self.learner
        settings = learner.settings
        try:
            while not self._learn_stop.is_set() and not self.stopping.is_set():
                if settings.rounds and learner.round >= settings.rounds:
                    break
                metrics = learner.train_round()
                self._push(learner)
                self._learn_stop.wait(settings.round_interval_s)
                merged = learner.merge()
                learner.finish_round(metrics, merged)
        except Exception as err:  # noqa: BLE001 - learning may fail; serving must go on
            log.exception("learning stopped by an error")
            self._learn_error = f"{type(err).__name__}: {err}"
        finally:
            self._learn_stop.set()
            if not self.stopping.is_set():
                # a run that ended by itself (rounds reached, error) tells the fleet, so peers
                # stop sending models this device would drop
                self._announce()

    def _push(self, learner: Any) -> None:
        peers = learner.choose_peers(self.online_peers(learning_only=True))
        if not peers:
            return
        frame = seal_tensors(
            learner.state(),
            codec=learner.settings.codec,
            binary_names=learner.binary_names,
            sender=self.config.id,
            keyring=self.keyring,
            extra={
                "round": learner.round,
                "samples": len(learner.data),
                "model": learner.model_name,
            },
        )
        chunks = split_chunks(
            frame, chunk_bytes=self.config.chunk_bytes, sender=self.config.id, keyring=self.keyring
        )
        messages = [(self.topics.gossip(peer), chunk) for peer in peers for chunk in chunks]
        try:
            # flow-controlled: a model of more chunks than the transport's queue still arrives
            self.transport.publish_many(messages, qos=1, cancel=self._learn_stop)
        except TransportError as err:
            if self._learn_stop.is_set():  # learn.stop or shutdown cut the push short
                log.info("round %d: push to %s cut short: learning stops", learner.round, peers)
                return
            self.push_failures += 1
            log.warning("round %d: push to %s incomplete: %s", learner.round, peers, err)

    def _on_gossip(self, topic: str, payload: bytes) -> None:
        try:
            frame = self.verifier.receive(payload)
        except FrameRejected:
            return
        if frame is None:
            return
        learner = self.learner
        if frame.type != "gossip" or not frame.binary:
            self.drops.count("bad_request")
            return
        if learner is None or not self.learning:
            self.drops.count("not_learning")
            return
        if frame.header.get("model") != learner.model_name:
            self.drops.count("wrong_model")
            return
        try:
            _, tensors = self.verifier.open_tensors(frame, learner.expected)
        except FrameRejected:
            return
        samples = frame.header.get("samples", 1)
        samples = samples if isinstance(samples, int | float) and samples > 0 else 1
        learner.receive(frame.sender, tensors, samples)

    # ----------------------------------------------------------------------------- telemetry
    def drop_counts(self) -> dict[str, int]:
        counts = dict(self._base_counters)
        for source in (self.verifier.drops.snapshot(), self.drops.snapshot()):
            for reason, n in source.items():
                counts[reason] = counts.get(reason, 0) + n
        return counts

    def telemetry(self) -> dict[str, Any]:
        import psutil

        process = psutil.Process()
        latencies = sorted(self.latencies)
        learner = self.learner
        return {
            "ts": time.time(),
            "uptime_s": time.time() - self._started,
            "cpu_percent": process.cpu_percent(interval=None),
            "rss_mb": process.memory_info().rss / 2**20,
            "temperature_c": _temperature(),
            "model": self.artifact.name if self.artifact else None,
            "version": self.artifact.version if self.artifact else None,
            "latency_ms": {
                "p50": _quantile(latencies, 0.50),
                "p95": _quantile(latencies, 0.95),
                "count": len(latencies),
            },
            "learning": {
                "on": self.learning,
                "round": learner.round if learner else None,
                "accuracy": learner.metrics.get("accuracy") if learner else None,
                "merges": learner.merges if learner else None,
                "pending": learner.pending if learner else None,
                "error": self._learn_error,
                "push_failures": self.push_failures,
            },
            "drops": self.drop_counts(),
            "connects": self.transport.connect_count,
            "torch_loaded": "torch" in __import__("sys").modules,
        }

    def _heartbeat(self) -> None:
        while not self.stopping.wait(self.config.heartbeat_s):
            try:
                if not self.transport.connected:
                    continue  # telemetry is QoS 0 and only worth anything fresh: skip it
                body = self.telemetry()
                frame = seal_json("telemetry", body, sender=self.config.id, keyring=self.keyring)
                self.transport.publish(self.topics.telemetry(self.config.id), frame, qos=0)
                self._save_counters()
            except Exception:  # noqa: BLE001 - a failed heartbeat must not end the loop
                log.exception("heartbeat failed")

    def _save_counters(self) -> None:
        try:
            self.store.save_counters(self.drop_counts())
        except OSError as err:
            log.warning("cannot save counters: %s", err)


def load_keyring(config: AgentConfig) -> Keyring:
    """The fleet key, plus per-device keys from ``device_keys_dir`` (``<device>.key`` files).

    With per-device keys a device signs with its own key and verifies each peer with that
    peer's key, so a device that leaks its key lets an attacker impersonate it alone.
    """
    device_keys: dict[str, bytes] = {}
    try:
        if config.device_keys_dir:
            for file in sorted(Path(config.device_keys_dir).glob("*.key")):
                device_keys[file.stem] = file.read_bytes()
        return Keyring.from_file(config.key_file, device_keys)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot use the keys ({err})") from None


def _quantile(ordered: list[float], q: float) -> float | None:
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


def _manifest_spec(path: Path) -> dict[str, Any] | None:
    import json

    try:
        spec = json.loads((path / "manifest.json").read_text()).get("spec")
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def _decode_inputs(inputs: Any) -> np.ndarray:
    """A batch from JSON: nested lists, or ``{"b64": base64 float32, "shape": [...]}``."""
    if isinstance(inputs, dict) and "b64" in inputs:
        try:
            raw = base64.b64decode(inputs["b64"], validate=True)
            shape = tuple(int(d) for d in inputs["shape"])
            return np.frombuffer(raw, dtype="<f4").reshape(shape)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(
                f"bad b64 inputs ({err}); send float32 bytes and their shape"
            ) from None
    if not isinstance(inputs, list):
        raise ValueError("inputs must be a nested list (N x C x H x W) or {'b64', 'shape'}")
    try:
        return np.asarray(inputs, dtype=np.float32)
    except (ValueError, TypeError) as err:
        raise ValueError(f"inputs are not a rectangular array of numbers ({err})") from None


def _temperature() -> float | None:
    """CPU temperature in Celsius where the OS exposes it (Raspberry Pi, Jetson, most Linux)."""
    zone = Path("/sys/class/thermal/thermal_zone0/temp")
    try:
        return int(zone.read_text().strip()) / 1000.0
    except (OSError, ValueError):
        return None
