"""The laptop's side of the fleet protocol: find devices, send commands, publish artifacts.

:class:`FleetClient` speaks exactly what :mod:`edge_agent.agent` understands, through the same
protocol module (signed frames) and transport (one paho client)::

    from edge_agent.protocol import Command
    from toolkit.fleet import FleetClient

    with FleetClient("mqtt://127.0.0.1:1883", fleet="lab", key_file="fleet.key") as fleet:
        fleet.devices()                                  # {"pi-01": {"status": "online", ...}}
        args = fleet.publish_artifact("runs/art")        # retained, chunked, signed
        fleet.command("pi-01", Command.DEPLOY, args)     # args: name, version, sha256
        fleet.command("pi-01", Command.ROLLBACK)         # back to the last-good model
        fleet.infer("pi-01", batch)                      # logits from the device

A command returns the device's reply body (``{"id", "name", "ok", "result" | "error"}``, see
:func:`edge_agent.protocol.reply_body`) plus the ``device`` that sent it; :class:`FleetError` is
raised when no reply comes within the timeout, and says when the key may be to blame: frames
from the device that fail verification with this client's key, or a device whose state says it
is online but that does not answer (a device drops, silently, commands it cannot verify). A
``deploy`` waits at least as long as the device waits for the artifact (the args'
``timeout_s``), plus a margin, so the device's own error arrives. Every body is built and
checked by :mod:`edge_agent.protocol`, the one definition of the wire format.

:meth:`FleetClient.connect` returns once the broker has handed over the retained states: it
sends itself a message after subscribing, which the broker delivers after them, so
:meth:`FleetClient.devices` lists the fleet right away.
"""

from __future__ import annotations

import io
import json
import os
import queue
import secrets
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bitfleet.errors import BitfleetError
from edge_agent.protocol import (
    DEFAULT_CHUNK_BYTES,
    ONLINE,
    Command,
    FrameKind,
    FrameRejected,
    FrameVerifier,
    Keyring,
    ProtocolError,
    Topics,
    artifact_messages,
    command_body,
    encode_inputs,
    expect_json,
    infer_body,
    parse_deploy_args,
    parse_reply,
    reply_body,
    seal_json,
)
from edge_agent.transport import MqttTransport
from exporters.artifact import open_artifact

__all__ = ["FleetClient", "FleetError", "artifact_tar"]


class FleetError(BitfleetError, RuntimeError):
    """A device that did not answer, or an artifact that cannot be published."""


def artifact_tar(path: str | os.PathLike[str]) -> tuple[bytes, dict[str, Any]]:
    """The verified artifact at ``path`` as deterministic .tar bytes, and its manifest."""
    root, manifest = open_artifact(path)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(f"artifact/{file.relative_to(root).as_posix()}")
            data = file.read_bytes()
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), manifest


# bytes a sealed JSON request adds around its inputs (header, id, signature), with a margin
_FRAME_OVERHEAD = 2048
_TIMEOUT_S = 30.0  # how long a request waits for its reply by default
_ABORTED = "__aborted__"
"""Key of the stand-in reply :meth:`FleetClient.abort_pending` puts in a waiting inbox."""
# a deploy waits for the device's artifact wait plus this: installing, the health check, and a
# slow command that may run before it on the device's worker
_DEPLOY_MARGIN_S = 30.0
_SYNC_S = 5.0  # longest wait, after subscribing, for the broker to hand over the retained states
# drop reasons that mean "signed with another key" (the others: clocks, replays, damage)
_KEY_REASONS = frozenset({"forged", "unsigned"})


class FleetClient:
    """One operator connection to a fleet (the ``laptop`` sender by default)."""

    def __init__(
        self,
        url: str,
        *,
        fleet: str,
        key_file: str | os.PathLike[str] | None = None,
        keyring: Keyring | None = None,
        sender: str = "laptop",
        username: str | None = None,
        password: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if keyring is None:
            if key_file is None:
                raise ValueError("pass key_file= (the fleet key) or keyring=")
            keyring = Keyring.from_file(key_file)
        self.keyring = keyring
        self.sender = sender
        self.topics = Topics(fleet)
        self.chunk_bytes = chunk_bytes
        self.verifier = FrameVerifier(keyring)
        self.transport = MqttTransport(
            url=url,
            client_id=f"{sender}-{secrets.token_hex(4)}",
            username=username,
            password=password,
        )
        self._states: dict[str, dict[str, Any]] = {}
        self._telemetry: dict[str, dict[str, Any]] = {}
        self._replies: dict[str, queue.Queue[dict[str, Any]]] = {}
        self._unverified: dict[str, str] = {}  # device -> why its last frame failed verification
        self._lock = threading.Lock()
        self._closed: str | None = None  # why requests now fail at once (set by close)

    def __enter__(self) -> FleetClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; return once the retained device states have arrived."""
        self.transport.subscribe(self.topics.all_states(), self._on_state)
        self.transport.subscribe(self.topics.all_replies(), self._on_reply)
        self.transport.subscribe(self.topics.all_telemetry(), self._on_telemetry)
        self.transport.connect(timeout=timeout)
        self.transport.wait_subscribed(timeout)
        self._sync(min(timeout, _SYNC_S))

    def _sync(self, timeout: float) -> None:
        """Wait until the broker has delivered what it holds for our subscriptions.

        A broker sends the retained messages of a subscription after acknowledging it, so they
        are still on their way when :meth:`connect` has its acknowledgements. A message we
        publish to a topic we subscribe to (a signed reply to ourselves, which other clients
        ignore) comes back after them. A broker that refuses it (an ACL) costs ``timeout``.
        """
        token = f"sync-{secrets.token_hex(8)}"
        inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        body = reply_body(token, "sync", {})
        frame = seal_json(FrameKind.REPLY, body, sender=self.sender, keyring=self.keyring)
        with self._lock:
            self._replies[token] = inbox
        try:
            self.transport.publish(self.topics.reply(self.sender), frame, qos=1)
            try:
                inbox.get(timeout=timeout)
            except queue.Empty:
                pass  # devices() then answers with what arrived so far
        finally:
            with self._lock:
                self._replies.pop(token, None)

    def close(self) -> None:
        """Disconnect. Requests still waiting, and any made from now on, fail at once."""
        with self._lock:
            self._closed = "the fleet client was closed"
        self.abort_pending(self._closed)
        self.transport.close()

    def abort_pending(self, reason: str) -> None:
        """Make every request still waiting for a reply fail now with ``reason``.

        For Ctrl-C: a thread blocked in :meth:`command` would otherwise hold the process for
        the rest of its timeout (the interpreter joins such threads before it exits).
        """
        with self._lock:
            inboxes = list(self._replies.values())
        for inbox in inboxes:
            inbox.put({_ABORTED: reason})

    # ------------------------------------------------------------------------------ incoming
    def _refused(self, topic: str, err: FrameRejected) -> None:
        """Remember that a frame on a device's topic failed verification with our keys."""
        parsed = self.topics.parse(topic)
        if parsed is not None and err.reason in _KEY_REASONS:
            with self._lock:
                self._unverified[parsed[0]] = err.reason

    def _verified(self, device: str) -> None:
        if self._unverified:
            with self._lock:
                self._unverified.pop(device, None)

    def _on_state(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse(topic)
        if parsed is None or not payload:
            return
        try:
            frame = self.verifier.open(payload, retained=True)
            body = expect_json(frame, FrameKind.STATE)
        except FrameRejected as err:
            self._refused(topic, err)
            return
        except ProtocolError:
            return
        if frame.sender == parsed[0]:
            self._verified(frame.sender)
            # the latest arrival wins, not the latest timestamp: a last will is sealed when
            # the device connects but published by the broker when it dies, after its online
            # states; MQTT keeps messages on one topic in order
            with self._lock:
                self._states[frame.sender] = {**body, "ts": frame.ts}

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse(topic)
        if parsed is None:
            return
        try:
            frame = self.verifier.receive(payload)
            if frame is None:
                return
            body = expect_json(frame, FrameKind.TELEMETRY)
        except FrameRejected as err:
            self._refused(topic, err)
            return
        except ProtocolError:
            return
        if frame.sender != parsed[0]:
            return  # a device writes only its own telemetry
        self._verified(frame.sender)
        with self._lock:
            self._telemetry[frame.sender] = {**body, "ts": body.get("ts", frame.ts)}

    def _on_reply(self, topic: str, payload: bytes) -> None:
        try:
            frame = self.verifier.receive(payload)  # a big reply comes in chunks
            if frame is None:
                return
            body = expect_json(frame, FrameKind.REPLY)
            reply = parse_reply(body)
        except FrameRejected as err:
            self._refused(topic, err)
            return
        except ProtocolError:
            return
        with self._lock:
            waiting = self._replies.get(str(reply.id))
        if waiting is not None:
            waiting.put({**body, "device": frame.sender})

    # ------------------------------------------------------------------------------- queries
    def devices(self) -> dict[str, dict[str, Any]]:
        """Every device's latest retained state (online or offline)."""
        with self._lock:
            return {k: dict(v) for k, v in self._states.items()}

    def telemetry(self, device: str) -> dict[str, Any] | None:
        """``device``'s latest telemetry body (None before its first heartbeat arrived).

        Telemetry is not retained: it arrives every ``heartbeat_s`` after :meth:`connect`.
        Its ``ts`` is when the device sealed it.
        """
        with self._lock:
            body = self._telemetry.get(device)
            return None if body is None else dict(body)

    def unverified(self) -> dict[str, str]:
        """Devices whose latest frame failed verification with this client's key, and why."""
        with self._lock:
            return dict(self._unverified)

    def wait_for(self, predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
        """Poll ``predicate(devices())`` until true or ``timeout`` (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.devices()):
                return True
            time.sleep(interval)
        return bool(predicate(self.devices()))

    # ------------------------------------------------------------------------------ requests
    def _request(
        self,
        device: str,
        topic: str,
        kind: str,
        what: str,
        body: Callable[[str], dict[str, Any]],
        timeout: float,
    ) -> dict[str, Any]:
        """Publish ``body(request id)`` as a ``kind`` frame on ``topic``; the reply (FleetError).

        The body is built and sealed first, so a bad one raises before anything waits.
        """
        request_id = secrets.token_hex(8)
        frame = seal_json(kind, body(request_id), sender=self.sender, keyring=self.keyring)
        inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            if self._closed is not None:
                raise FleetError(f"{what} to {device} not sent: {self._closed}")
            self._replies[request_id] = inbox
        try:
            self.transport.publish(topic, frame, qos=1)
            try:
                reply = inbox.get(timeout=timeout)
            except queue.Empty:
                raise FleetError(self._no_answer(device, what, timeout)) from None
            if _ABORTED in reply:
                raise FleetError(f"{what} to {device} abandoned: {reply[_ABORTED]}")
            return reply
        finally:
            with self._lock:
                self._replies.pop(request_id, None)

    def _no_answer(self, device: str, what: str, timeout: float) -> str:
        """Why ``device`` may not have answered ``what``: the message of the FleetError."""
        with self._lock:
            refused = self._unverified.get(device)
            state = self._states.get(device)
        late = f"did not answer {what!r} within {timeout:g} s"
        if refused is not None:
            return (
                f"{device} {late}, and its frames fail verification with this client's key "
                f"({refused}): the key may be wrong. Use the key the device runs with (its "
                "--key-file, or its own key with per-device keys); a device drops, without a "
                "word, commands it cannot verify"
            )
        if state is not None and state.get("status") == ONLINE:
            return (
                f"{device} is online but {late}: it may be busy, or its key may differ from "
                "this client's (a device drops, without a word, commands it cannot verify); "
                "check that both use the same key"
            )
        if state is not None:
            return f"{device} {late}: its last state says it is {state.get('status')}"
        return (
            f"{device} {late} (is it online? FleetClient.devices() lists every device and its "
            "status)"
        )

    def command(
        self,
        device: str,
        name: str,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send a command to ``device``; its reply body.

        ``timeout`` (default 30 s) is how long to wait for the reply. A ``deploy`` waits at
        least as long as the device waits for the artifact's chunks (its args' ``timeout_s``,
        60 s by default) plus a margin, so that the device's own error, "did not arrive", say,
        is what the caller gets. Raises ``ProtocolError`` (a ``ValueError``) for an invalid
        device id, command name or arguments that are not a JSON object, before anything is
        sent.
        """
        wait = _TIMEOUT_S if timeout is None else float(timeout)
        if name == Command.DEPLOY and isinstance(args, Mapping):
            try:
                device_wait = parse_deploy_args(args or {}).timeout_s
            except ProtocolError:
                device_wait = 0.0  # bad args: the device answers at once
            wait = max(wait, device_wait + _DEPLOY_MARGIN_S if device_wait else 0.0)
        return self._request(
            device,
            self.topics.cmd(device),
            FrameKind.CMD,
            name,
            lambda request_id: command_body(device, name, args, request_id),
            wait,
        )

    def infer(self, device: str, batch: np.ndarray, timeout: float = 30.0) -> dict[str, Any]:
        """Run a batch on ``device`` over MQTT; the reply (``result`` holds the logits).

        The batch travels as base64 float32 with its shape (exact, and a third of the size of
        nested JSON lists). A request must fit one MQTT packet (``max_packet_bytes``, 1 MB by
        default): about 180 images of 1x32x32, or one of 3x224x224, per call.
        """
        array = np.asarray(batch)
        if array.ndim == 0 or len(array) == 0:
            raise ValueError("the batch is empty; send an array of shape N x C x H x W")
        inputs = encode_inputs(array)
        size = len(json.dumps(inputs))
        room = self.transport.max_packet_bytes - _FRAME_OVERHEAD
        if size > room:
            per_item = size / len(array)
            raise ValueError(
                f"a batch of {len(array)} inputs is {size} bytes as base64, over the "
                f"{room}-byte room of one MQTT packet; send at most "
                f"{max(1, int(room // per_item))} per call"
            )
        return self._request(
            device,
            self.topics.infer(device),
            FrameKind.INFER,
            FrameKind.INFER,
            lambda request_id: infer_body(inputs, request_id),
            timeout,
        )

    def publish_artifact(
        self, path: str | os.PathLike[str], *, name: str | None = None, version: str | None = None
    ) -> dict[str, str]:
        """Publish an artifact as retained, signed chunks; the ``deploy`` args that fetch it."""
        data, manifest = artifact_tar(path)
        name = name or str(manifest.get("name") or Path(path).name)
        version = version or str(manifest.get("version") or "1")
        args, messages = artifact_messages(
            self.topics,
            data,
            name=name,
            version=version,
            sender=self.sender,
            keyring=self.keyring,
            chunk_bytes=self.chunk_bytes,
        )
        for topic, chunk in messages:
            self.transport.publish_and_wait(topic, chunk, qos=1, retain=True)
        return args
