"""The MQTT protocol of a bitfleet fleet: topics, signed frames, and the checks receivers make.

This module is the one definition of what travels between devices, the broker and the laptop
(docs/design.md, section 5). It is pure Python plus numpy and :mod:`edge_agent.codecs`: it builds
and checks bytes, and never touches the network, so the agent, the CLI and the tests share it.

Topics live under ``bitfleet/<fleet>/`` (:class:`Topics`)::

    bitfleet/<fleet>/dev/<id>/state       retained JSON; the last will says offline
    bitfleet/<fleet>/dev/<id>/telemetry   periodic JSON: resources, model, latency, drop counts
    bitfleet/<fleet>/dev/<id>/cmd         commands to one device ...
    bitfleet/<fleet>/dev/<id>/reply       ... answered here, with the command id
    bitfleet/<fleet>/dev/<id>/gossip      models pushed by peers (binary frames)
    bitfleet/<fleet>/dev/<id>/infer       inference requests and replies
    bitfleet/<fleet>/artifacts/<name>/<version>   manifests and chunks for rollout

Every frame carries an envelope: schema version ``v`` (:data:`SCHEMA_VERSION`), ``type``,
``sender``, ``ts`` (unix seconds) and a random ``nonce`` (16 bytes, 32 lowercase hex
characters), and is signed with HMAC-SHA256 under :meth:`Keyring.key_for` of its sender, over
the exact bytes that travel: a receiver checks the signature over the bytes it received and
never re-serialises anything, so a client in any language may format its JSON as it likes
(key order, spacing, ``1796109625.500000`` for a float). Two encodings (docs/protocol.md
describes both byte for byte, with a signed ``ping`` sent from a shell):

- **JSON frames** (commands, replies, state, telemetry, inference) are one UTF-8 JSON object
  ``{"v": 2, "sender": "<id>", "payload": "<JSON text>", "sig": "<hex>"}``. ``payload`` is a
  JSON string holding the envelope and body as JSON text,
  ``{"v", "type", "sender", "ts", "nonce", "body": {...}}``; ``sig`` is the HMAC over the
  UTF-8 bytes of that string. The outer ``sender`` names the key to verify with, so the
  payload is authenticated before it is parsed; it must equal the ``sender`` inside.
- **Binary frames** (gossip tensors, chunks, artifact chunks) are laid out as::

      MAGIC (b"BFF2") | header length (uint32, big-endian) | header (JSON) | body | HMAC (32)

  where the header holds the envelope plus type-specific fields (``codec`` for gossip) and the
  HMAC covers every byte before it. Tensors travel as :mod:`edge_agent.codecs` payloads
  (safetensors, never pickle). The digit of :data:`MAGIC` is the schema version.

A receiver trusts nothing it has not checked. :meth:`FrameVerifier.open` drops a frame with
:class:`FrameRejected`, whose ``reason`` is one of :data:`DROP_REASONS`: ``oversized`` (before
parsing anything), then ``malformed`` or ``version`` for a frame whose outer layout (the JSON
wrapper; the binary framing and header) it cannot read or whose version is not its own, then
``unsigned`` and ``forged``; only a frame whose signature verifies has its payload parsed and
its envelope checked (``malformed``, ``version``; ``forged`` for a payload whose sender is not
the one the frame was verified as), and then ``stale``, ``future``, ``replayed``. The signature
is checked before the nonce is recorded, so a forged frame cannot poison the replay cache;
:meth:`FrameVerifier.open_tensors` adds ``bad_tensor`` (names, shapes, dtype kinds, NaN/Inf).
The verifier counts every drop in its :class:`DropCounter`, which the agent reports in
telemetry, and logs it at debug level on the ``bitfleet.protocol`` logger, with the reason and
the sender (and topic) where known, so ``--log-level debug`` shows why a frame vanished::

    from edge_agent.protocol import FrameVerifier, Keyring, Topics, seal_tensors

    keys = Keyring.from_file("fleet.key")
    topics = Topics("lab")
    data = seal_tensors(model, codec="sign", binary_names=binary, sender="pi-2", keyring=keys,
                        extra={"round": 3, "samples": 120, "model": "lenet5"})
    # client.publish(topics.gossip("pi-7"), data) ... and on pi-7, with the payload received:
    verifier = FrameVerifier(keys)
    frame, tensors = verifier.open_tensors(payload, expected=shapes_and_dtypes)
    verifier.drops.snapshot()   # {"oversized": 0, "malformed": 0, ...}

Payloads larger than a chunk (:data:`DEFAULT_CHUNK_BYTES`; brokers such as EMQX refuse packets
over 1 MB by default) are cut by :func:`split_chunks` into signed ``"chunk"`` frames and put
back together by a :class:`Reassembler`; :meth:`FrameVerifier.receive` does both sides of that
for the agent: it returns the inner frame once every chunk has arrived, and ``None`` before.

What the JSON frames carry is built and parsed here too, so the agent and
:class:`toolkit.fleet.FleetClient` cannot drift apart. :class:`FrameKind` names the frame types
and :class:`Command` the commands; every builder has a parser that checks what arrives and
raises :class:`ProtocolError` (a :class:`~bitfleet.errors.BitfleetError`) for a body that breaks
the protocol::

    body = command_body("pi-7", Command.DEPLOY, deploy_args("lenet5", "3", digest), "c1")
    # {"id": "c1", "target": "pi-7", "name": "deploy", "args": {"name": ..., "version": ...}}
    request = parse_command(body, target="pi-7")      # CommandRequest(id, target, name, args)
    reply_body(request.id, request.name, {"slot": ...})   # {"id", "name", "ok": true, "result"}
    reply_body(request.id, request.name, error="...")     # {"id", "name", "ok": false, "error"}
    parse_reply(body)                                     # Reply(id, name, ok, result, error)
    infer_body(encode_inputs(batch), "r1")                # {"id", "inputs": {"b64", "shape"}}
    decode_inputs(parse_infer(body).inputs)               # the float32 batch again

An artifact travels as one signed ``"artifact"`` frame (header ``name``, ``version``, ``sha256``
of the .tar bytes it carries), cut into chunks that are published, retained, on
``artifacts/<name>/<version>/<index>`` (:func:`artifact_messages`); a device collects them from
``artifacts/<name>/<version>/#`` with :meth:`FrameVerifier.receive` (``retained=True``), the
same reassembly gossip and chunked replies go through.

Keys are symmetric (HMAC, standard library only): whoever can verify a sender's frames can also
sign as that sender. Per-device keys therefore protect a device from peers that do not hold its
key (for example, only the device and the laptop hold it), not from those that do. Nor is the
topic part of the signature: a frame that matters to one device only (a command) should name
that device in its body, and the device should check it, or the same frame could be replayed
to a peer whose replay cache has never seen it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import heapq
import hmac
import json
import logging
import math
import os
import re
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeGuard, TypeVar

import numpy as np
import numpy.typing as npt

from bitfleet.errors import BitfleetError
from edge_agent.codecs import CODECS, CodecError, decode, encode

__all__ = [
    "BAD_INPUT",
    "BAD_OUTPUT",
    "BAD_REQUEST",
    "CAPABILITIES",
    "COMMANDS",
    "DEFAULT_CHUNK_BYTES",
    "DROP_REASONS",
    "KINDS",
    "MAGIC",
    "MIN_KEY_BYTES",
    "MISADDRESSED",
    "OFFLINE",
    "ONLINE",
    "SCHEMA_VERSION",
    "Command",
    "CommandRequest",
    "DeployArgs",
    "DropCounter",
    "Frame",
    "FrameKind",
    "FrameRejected",
    "FrameVerifier",
    "GossipInfo",
    "InferRequest",
    "Keyring",
    "ProtocolError",
    "Reassembler",
    "Reply",
    "Topics",
    "artifact_messages",
    "check_tensors",
    "command_body",
    "decode_inputs",
    "deploy_args",
    "encode_inputs",
    "expect_binary",
    "expect_json",
    "gossip_extra",
    "gossip_info",
    "infer_body",
    "parse_command",
    "parse_deploy_args",
    "parse_infer",
    "parse_reply",
    "reply_body",
    "seal_binary",
    "seal_json",
    "seal_tensors",
    "split_chunks",
    "state_body",
    "state_online",
    "validate_name",
]

SCHEMA_VERSION = 2
"""The protocol version every frame carries as ``v`` (and binary frames in :data:`MAGIC`).

Receivers drop a frame of any other version as ``"version"``. Version 1 signed a JSON frame
over a re-serialised canonical form of it; version 2 signs the bytes that travel.
"""

MAGIC = b"BFF%d" % SCHEMA_VERSION
"""The first four bytes of a binary frame: ``b"BFF"`` and the schema version's digit."""

MIN_KEY_BYTES = 32
"""Shortest key accepted: 256 bits, the output size of SHA-256."""

DEFAULT_CHUNK_BYTES = 256 * 1024
"""Largest payload sent as one message; bigger ones are split into chunk frames."""


class FrameKind:
    """The frame types (a frame's ``type``); the first six are also per-device topic kinds."""

    STATE = "state"
    TELEMETRY = "telemetry"
    CMD = "cmd"
    REPLY = "reply"
    GOSSIP = "gossip"
    INFER = "infer"
    ARTIFACT = "artifact"
    CHUNK = "chunk"


KINDS: tuple[str, ...] = (
    FrameKind.STATE,
    FrameKind.TELEMETRY,
    FrameKind.CMD,
    FrameKind.REPLY,
    FrameKind.GOSSIP,
    FrameKind.INFER,
)
"""The per-device topic kinds, ``bitfleet/<fleet>/dev/<id>/<kind>``."""


class Command:
    """The commands a device obeys: the ``name`` of a command body."""

    PING = "ping"
    STATUS = "status"
    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    LEARN_START = "learn.start"
    LEARN_STOP = "learn.stop"
    CONFIG_SET = "config.set"
    LOGS = "logs"
    HISTORY = "history"
    METRICS = "metrics"


COMMANDS: tuple[str, ...] = tuple(v for k, v in vars(Command).items() if k.isupper())
"""Every command name, in the order :class:`Command` defines them (and messages list them)."""

ONLINE = "online"
"""The ``status`` of a device's retained state while it is connected."""

CAPABILITIES: tuple[str, ...] = (FrameKind.INFER, Command.DEPLOY, "learn")
"""What an agent offers, listed in its state's ``capabilities``."""

OFFLINE = "offline"
"""The ``status`` its last will and its clean shutdown publish."""

BAD_REQUEST = "bad_request"
"""Drop reason: a well-signed frame of the wrong type or with a body that breaks the protocol."""

MISADDRESSED = "misaddressed"
"""Drop reason: a frame meant for another device (or a state published for another sender)."""

BAD_INPUT = "bad_input"
"""Drop reason: an inference request whose batch holds NaN or Inf."""

BAD_OUTPUT = "bad_output"
"""Drop reason: an inference request for which the model returned non-finite logits."""

DROP_REASONS: tuple[str, ...] = (
    "oversized",
    "malformed",
    "version",
    "unsigned",
    "forged",
    "stale",
    "future",
    "replayed",
    "bad_tensor",
)
"""Why a frame was dropped, roughly in the order :meth:`FrameVerifier.open` checks (then tensors).

Exactly: ``oversized``; ``malformed``/``version`` for the outer layout (JSON wrapper, binary
framing and header); ``unsigned``; ``forged``; then, for the verified payload, ``malformed``/
``version`` (and ``forged`` if it names another sender); ``stale``; ``future``; ``replayed``.
The reassembler adds ``"chunk_overflow"`` and ``"chunk_timeout"``.
"""

_MAGIC_FAMILY = MAGIC[:3]  # a binary frame of any version starts with these
_ROOT = "bitfleet"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX_RE = re.compile(r"[0-9a-f]*")
_SIG_RE = re.compile(r"[0-9a-fA-F]*")
_NONCE_BYTES = 16
_MAC_BYTES = 32
_LEN = struct.Struct(">I")
_ENVELOPE = ("v", "type", "sender", "ts", "nonce")
_JSON_KEYS = frozenset([*_ENVELOPE, "body"])  # the payload of a JSON frame
_WRAPPER_KEYS = frozenset(["v", "sender", "payload", "sig"])  # the JSON frame around it
_JSON_WHITESPACE = b" \t\r\n"
_CHUNK = FrameKind.CHUNK
_GOSSIP = FrameKind.GOSSIP
_DEV = "dev"
_ARTIFACTS = "artifacts"
_ANY_ONE = "+"  # MQTT wildcard: one topic level
_ANY_BELOW = "#"  # MQTT wildcard: every level below
_DEFAULT_DEPLOY_TIMEOUT_S = 60.0
_CHUNK_OVERHEAD = 1024  # header + signature bytes a chunk frame may add to its slice

log = logging.getLogger("bitfleet.protocol")


# ------------------------------------------------------------------------------------- errors


class ProtocolError(BitfleetError, ValueError):
    """A name, body or frame that breaks the protocol, built here or received.

    ``reason`` is a short machine-readable key, the drop counter a receiver counts it under
    (:data:`BAD_REQUEST` unless said otherwise). ``reply`` is set when the sender deserves an
    answer rather than silence: the error reply body (:func:`reply_body`) to send back, e.g. for
    a command addressed to this device whose ``args`` are not a JSON object.
    """

    def __init__(
        self, message: str, reason: str = BAD_REQUEST, *, reply: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.reply = reply


# --------------------------------------------------------------------------- names and topics


def validate_name(text: str, what: str = "name") -> str:
    """Return ``text`` if it is a valid fleet, device or artifact name, else ProtocolError.

    Valid names are 1 to 64 characters of ``A-Z a-z 0-9 _ . -``: no MQTT separators or
    wildcards (``/ + #``), nothing a shell or a file path would read specially. ``"."`` and
    ``".."`` are refused too, since artifact names also become directory names.
    """
    if not isinstance(text, str) or not _NAME_RE.fullmatch(text) or text in (".", ".."):
        shown = _one_line(repr(text), 80)
        raise ProtocolError(f"invalid {what} {shown}: use 1-64 characters of A-Z a-z 0-9 _ . -")
    return text


@dataclass(frozen=True)
class Topics:
    """The topic names of one fleet, all under ``bitfleet/<fleet>/``.

    >>> Topics("lab").gossip("pi-2")
    'bitfleet/lab/dev/pi-2/gossip'
    >>> Topics("lab").parse("bitfleet/lab/dev/pi-2/gossip")
    ('pi-2', 'gossip')
    """

    fleet: str

    def __post_init__(self) -> None:
        validate_name(self.fleet, "fleet name")

    @property
    def root(self) -> str:
        """``bitfleet/<fleet>``, without a trailing slash."""
        return f"{_ROOT}/{self.fleet}"

    def _dev(self, device: str, kind: str) -> str:
        return f"{self.root}/{_DEV}/{validate_name(device, 'device id')}/{kind}"

    def state(self, device: str) -> str:
        """Retained JSON state of ``device``; its last will publishes ``offline`` here."""
        return self._dev(device, FrameKind.STATE)

    def telemetry(self, device: str) -> str:
        """Periodic JSON telemetry of ``device``."""
        return self._dev(device, FrameKind.TELEMETRY)

    def cmd(self, device: str) -> str:
        """Commands to ``device``."""
        return self._dev(device, FrameKind.CMD)

    def reply(self, device: str) -> str:
        """Answers of ``device`` to its commands."""
        return self._dev(device, FrameKind.REPLY)

    def gossip(self, device: str) -> str:
        """Models pushed to ``device`` by its peers."""
        return self._dev(device, FrameKind.GOSSIP)

    def infer(self, device: str) -> str:
        """Inference requests to ``device``."""
        return self._dev(device, FrameKind.INFER)

    def artifact(self, name: str, version: str) -> str:
        """Base topic of one artifact version (manifests and chunks go below it)."""
        name = validate_name(name, "artifact name")
        version = validate_name(version, "artifact version")
        return f"{self.root}/{_ARTIFACTS}/{name}/{version}"

    def artifact_chunk(self, name: str, version: str, index: int) -> str:
        """Where chunk ``index`` of an artifact is published (retained)."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ProtocolError(f"chunk index must be a non-negative integer, got {index!r}")
        return f"{self.artifact(name, version)}/{index}"

    def artifact_chunks(self, name: str, version: str) -> str:
        """Wildcard subscription to every chunk of one artifact version."""
        return f"{self.artifact(name, version)}/{_ANY_BELOW}"

    def every_device(self, kind: str) -> str:
        """Wildcard subscription to topic ``kind`` (one of :data:`KINDS`) of every device."""
        if kind not in KINDS:
            raise ProtocolError(f"unknown topic kind {kind!r}; known: {', '.join(KINDS)}")
        return f"{self.root}/{_DEV}/{_ANY_ONE}/{kind}"

    def all_states(self) -> str:
        """Wildcard subscription to every device's state: how peers are discovered."""
        return self.every_device(FrameKind.STATE)

    def all_replies(self) -> str:
        """Wildcard subscription to every device's replies (the laptop's inbox)."""
        return self.every_device(FrameKind.REPLY)

    def all_telemetry(self) -> str:
        """Wildcard subscription to every device's telemetry."""
        return self.every_device(FrameKind.TELEMETRY)

    def parse(self, topic: str) -> tuple[str, str] | None:
        """``(device, kind)`` for a device topic of this fleet, else ``None``."""
        if not isinstance(topic, str):
            return None
        parts = topic.split("/")
        if len(parts) != 5 or parts[:3] != [_ROOT, self.fleet, _DEV] or parts[4] not in KINDS:
            return None
        if not _NAME_RE.fullmatch(parts[3]) or parts[3] in (".", ".."):
            return None
        return parts[3], parts[4]


# ----------------------------------------------------------------------------------------- keys


class Keyring:
    """The fleet key and optional per-device keys; :meth:`key_for` picks the signing key.

    A sender with its own key in ``device_keys`` signs (and is verified) with that key only, so
    holders of the fleet key alone cannot impersonate it; every other sender uses the fleet key.
    Keys are raw bytes of at least :data:`MIN_KEY_BYTES`. ``repr`` never shows them.

    Args:
        fleet_key: the shared fleet key.
        device_keys: optional ``device id -> key``.
    """

    def __init__(self, fleet_key: bytes, device_keys: Mapping[str, bytes] | None = None) -> None:
        self._fleet_key = _check_key(fleet_key, "fleet key")
        self._device_keys: dict[str, bytes] = {}
        for device, key in (device_keys or {}).items():
            validate_name(device, "device id")
            self._device_keys[device] = _check_key(key, f"key of device {device!r}")

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], device_keys: Mapping[str, bytes] | None = None
    ) -> Keyring:
        """A keyring whose fleet key is the raw bytes of the file at ``path`` (nothing stripped).

        Raises :class:`ProtocolError` if the file holds fewer than :data:`MIN_KEY_BYTES` bytes,
        and ``OSError`` if it cannot be read.
        """
        with open(path, "rb") as handle:
            key = handle.read()
        if len(key) < MIN_KEY_BYTES:
            raise ProtocolError(
                f"key file {os.fspath(path)!r} holds {len(key)} bytes, need at least "
                f"{MIN_KEY_BYTES}; generate one with: head -c 32 /dev/urandom > fleet.key"
            )
        return cls(key, device_keys)

    @classmethod
    def from_files(
        cls,
        key_file: str | os.PathLike[str],
        device_keys_dir: str | os.PathLike[str] | None = None,
    ) -> Keyring:
        """The fleet key of ``key_file`` plus every ``<device>.key`` file of ``device_keys_dir``.

        How an agent and the laptop read their keys, so both verify a device that signs with
        its own key alike. Raises :class:`ProtocolError` for a fleet key that is too short and
        ``OSError`` for a file or folder that cannot be read.
        """
        device_keys: dict[str, bytes] = {}
        if device_keys_dir:
            for file in sorted(Path(device_keys_dir).glob("*.key")):
                device_keys[file.stem] = file.read_bytes()
        return cls.from_file(key_file, device_keys)

    def key_for(self, sender: str) -> bytes:
        """The key for frames from ``sender``: its own key if it has one, else the fleet key."""
        return self._device_keys.get(sender, self._fleet_key)

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices that have their own key."""
        return tuple(self._device_keys)

    def __repr__(self) -> str:
        return f"Keyring(fleet key, {len(self._device_keys)} device keys)"


def _check_key(key: bytes, what: str) -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise ProtocolError(f"{what} must be bytes, got {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise ProtocolError(f"{what} is too short: {len(key)} bytes, need at least {MIN_KEY_BYTES}")
    return bytes(key)


# --------------------------------------------------------------------------------------- frames


class FrameRejected(ProtocolError):
    """A frame a receiver drops; ``reason`` names why (see :data:`DROP_REASONS`).

    Args:
        reason: a short machine-readable reason, the key of the drop counter.
        detail: a human-readable explanation, shortened to one line.

    Attributes:
        sender: the sender the frame claims, once the verifier has read it (else ``None``;
            claimed, not proven, unless the reason comes after the signature check).
        frame_type: the frame's ``type``, once the verifier has read it (else ``None``).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.detail = _one_line(detail)
        self.sender: str | None = None
        self.frame_type: str | None = None
        super().__init__(f"{reason}: {self.detail}" if self.detail else reason, reason)


@dataclass(frozen=True)
class Frame:
    """A frame that passed every check of :meth:`FrameVerifier.open`.

    Attributes:
        version: the schema version (:data:`SCHEMA_VERSION`).
        type: the frame type, e.g. ``"cmd"``, ``"gossip"``, ``"chunk"``.
        sender: who signed it.
        ts: when it was sealed, unix seconds.
        nonce: 32 hex characters, unique per frame.
        header: the JSON body of a JSON frame; the type-specific header fields of a binary
            frame (the envelope fields ``v type sender ts nonce`` are not repeated here).
        body: the bytes of a binary frame; ``b""`` for a JSON frame.
        binary: whether it came as a binary frame.
    """

    version: int
    type: str
    sender: str
    ts: float
    nonce: str
    header: dict[str, Any]
    body: bytes = field(default=b"", repr=False)
    binary: bool = False

    @property
    def json(self) -> dict[str, Any]:
        """The body of a JSON frame (``ValueError`` for a binary frame)."""
        if self.binary:
            raise ValueError(f"{self.type!r} frame is binary: read .header and .body")
        return self.header


def _canonical(obj: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8, no NaN/Inf: how this module writes a binary header.

    Receivers never re-serialise: they verify the bytes they get, so any JSON formatting works.
    """
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def _compact(obj: Any) -> str:
    """JSON text in the object's own key order, no spaces, no NaN/Inf: a JSON frame's payload."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _envelope(type: str, sender: str, now: float | None) -> dict[str, Any]:
    validate_name(type, "frame type")
    validate_name(sender, "sender")
    ts = time.time() if now is None else float(now)
    if not math.isfinite(ts):
        raise ProtocolError(f"timestamp must be finite, got {ts}")
    return {
        "v": SCHEMA_VERSION,
        "type": type,
        "sender": sender,
        "ts": ts,
        "nonce": secrets.token_hex(_NONCE_BYTES),
    }


def seal_json(
    type: str,
    body: Mapping[str, Any],
    *,
    sender: str,
    keyring: Keyring,
    now: float | None = None,
) -> bytes:
    """A signed JSON frame of ``type`` carrying ``body`` (a JSON object with string keys).

    The frame is ``{"v": 2, "sender": sender, "payload": text, "sig": hex}``: ``text`` is the
    JSON of ``{"v", "type", "sender", "ts", "nonce", "body"}`` and ``sig`` the HMAC-SHA256 of
    its UTF-8 bytes under ``keyring.key_for(sender)``.

    ``now`` overrides the timestamp (unix seconds). Raises :class:`ProtocolError` for an invalid
    type or sender, or a body that does not survive a JSON round trip unchanged (non-string
    keys, NaN/Inf, lone surrogates, objects JSON cannot hold).
    """
    if not isinstance(body, Mapping):
        raise ProtocolError(f"body must be a JSON object, got {body.__class__.__name__}")
    obj = _envelope(type, sender, now)
    obj["body"] = dict(body)
    try:
        text = _compact(obj)
        stable = _compact(json.loads(text)) == text
        signed = text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise ProtocolError(f"body is not JSON: {_one_line(exc)}") from None
    if not stable:
        raise ProtocolError("body does not survive a JSON round trip (non-string keys?)")
    sig = hmac.new(keyring.key_for(sender), signed, hashlib.sha256).hexdigest()
    frame = {"v": SCHEMA_VERSION, "sender": sender, "payload": text, "sig": sig}
    return _compact(frame).encode("utf-8")


def seal_binary(
    type: str,
    header: Mapping[str, Any],
    body: bytes,
    *,
    sender: str,
    keyring: Keyring,
    now: float | None = None,
) -> bytes:
    """A signed binary frame of ``type``: type-specific ``header`` fields plus ``body`` bytes.

    ``header`` may not use the envelope names ``v type sender ts nonce``. Raises
    :class:`ProtocolError` for those, an invalid type or sender, or a header that is not JSON.
    """
    clash = sorted(set(header) & set(_ENVELOPE))
    if clash:
        raise ProtocolError(f"header fields {clash} are reserved for the envelope")
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"body must be bytes, got {body.__class__.__name__}")
    full = {**header, **_envelope(type, sender, now)}
    try:
        head = _canonical(full)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"header is not JSON: {_one_line(exc)}") from None
    signed = b"".join([MAGIC, _LEN.pack(len(head)), head, bytes(body)])
    return signed + hmac.new(keyring.key_for(sender), signed, hashlib.sha256).digest()


def seal_tensors(
    tensors: Mapping[str, np.ndarray],
    *,
    codec: str = "fp32",
    binary_names: Iterable[str] = (),
    sender: str,
    keyring: Keyring,
    extra: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> bytes:
    """A signed ``"gossip"`` frame: ``tensors`` encoded with ``codec`` (see :func:`codecs.encode`).

    The header holds ``codec`` and every field of ``extra`` (e.g. ``{"round": 3, "samples":
    120, "model": "lenet5"}``); ``extra`` may not use ``codec`` or the envelope names.
    """
    extra = dict(extra or {})
    if "codec" in extra:
        raise ProtocolError("extra may not set 'codec'; pass codec= instead")
    payload = encode(tensors, codec=codec, binary_names=binary_names)
    return seal_binary(
        _GOSSIP, {**extra, "codec": codec}, payload, sender=sender, keyring=keyring, now=now
    )


# ---------------------------------------------------------------------------- what frames carry


@dataclass(frozen=True)
class CommandRequest:
    """A checked command body (:func:`parse_command`).

    Attributes:
        id: the sender's id for the request, echoed in the reply (a string, an integer or
            ``None``).
        target: the device the command is for.
        name: the command, usually one of :data:`COMMANDS` (a newer client may send others;
            the device answers those with an error naming the commands it knows).
        args: the command's arguments, a JSON object.
    """

    id: str | int | None
    target: str
    name: str
    args: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """A checked reply body (:func:`parse_reply`): ``result`` when ``ok``, else ``error``."""

    id: str | int | None
    name: str | None
    ok: bool
    result: Any = None
    error: str | None = None


@dataclass(frozen=True)
class InferRequest:
    """A checked inference request body (:func:`parse_infer`); ``inputs`` as sent."""

    id: str | int | None
    inputs: Any


@dataclass(frozen=True)
class GossipInfo:
    """What a gossip frame's header says besides its codec (:func:`gossip_info`)."""

    model: str | None
    round: int | None
    samples: float


@dataclass(frozen=True)
class DeployArgs:
    """The arguments of a ``deploy`` command: which artifact, its SHA-256, how long to wait."""

    name: str
    version: str
    sha256: str
    timeout_s: float = _DEFAULT_DEPLOY_TIMEOUT_S


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _logs_refusals(what: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Make a parser of received bodies log each body it refuses, at debug level."""

    def decorate(parse: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(parse)
        def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return parse(*args, **kwargs)
            except ProtocolError as err:
                fate = "answered with an error" if err.reply is not None else "dropped"
                log.debug("refused %s body (%s): reason=%s: %s", what, fate, err.reason, err)
                raise

        return checked

    return decorate


def _request_id(body: Mapping[str, Any]) -> str | int | None:
    value = body.get("id")
    if value is None or isinstance(value, str) or _is_int(value):
        return value
    raise ProtocolError(f"request id must be a string or an integer, got {type(value).__name__}")


def _json_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ProtocolError(f"{what} must be a JSON object, got {type(value).__name__}")
    return dict(value)


def state_body(
    status: str,
    *,
    model: str | None,
    version: str | None,
    sha256: str | None,
    agent_version: str,
    learning: bool,
    model_spec: str | None,
    platform: str,
    instance: str,
    since: float,
) -> dict[str, Any]:
    """The body of a device's retained ``"state"`` frame.

    ``status`` is :data:`ONLINE` or :data:`OFFLINE`; the rest names the model it serves and what
    it offers (:data:`CAPABILITIES`). ``instance`` (random per process) and ``since`` (its start
    time) tell two agents that were given the same id apart, so the later one can stop.
    """
    if status not in (ONLINE, OFFLINE):
        raise ProtocolError(f"state status must be {ONLINE!r} or {OFFLINE!r}, got {status!r}")
    return {
        "status": status,
        "model": model,
        "version": version,
        "sha256": sha256,
        "agent_version": agent_version,
        "capabilities": list(CAPABILITIES),
        "learning": bool(learning),
        "model_spec": model_spec,
        "platform": platform,
        "instance": instance,
        "since": since,
    }


def state_online(body: Mapping[str, Any], *, learning: bool = False) -> bool:
    """Whether a state body says its device is online (and, with ``learning``, learning)."""
    return body.get("status") == ONLINE and (bool(body.get("learning")) or not learning)


def command_body(
    target: str, name: str, args: Mapping[str, Any] | None, id: str | int
) -> dict[str, Any]:
    """The body of a ``"cmd"`` frame: run command ``name`` with ``args`` on device ``target``.

    Raises :class:`ProtocolError` for an invalid device id or command name, arguments that are
    not a JSON object with string keys, or an id that is neither a string nor an integer.
    """
    validate_name(target, "device id")
    validate_name(name, "command name")
    body = {"id": id, "target": target, "name": name, "args": _json_object(args or {}, "args")}
    _request_id(body)
    return body


@_logs_refusals("command")
def parse_command(body: Any, *, target: str | None = None) -> CommandRequest:
    """Check a command body; with ``target``, also that it is addressed to that device.

    Raises :class:`ProtocolError`: with reason :data:`BAD_REQUEST` for a body that is not an
    object or names no valid target or id, :data:`MISADDRESSED` for a command sealed for
    another device (replayed onto this one's topic), and with an error ``reply`` for a command
    to this device whose ``name`` is not a string or whose ``args`` are not an object (the
    sender gets that answer instead of waiting for a reply that never comes).
    """
    if not isinstance(body, Mapping):
        raise ProtocolError(f"a command body must be a JSON object, got {type(body).__name__}")
    to = body.get("target")
    if not isinstance(to, str) or not _NAME_RE.fullmatch(to):
        raise ProtocolError("a command must name its target device")
    if target is not None and to != target:
        raise ProtocolError(f"a command for {to!r} arrived at {target!r}", MISADDRESSED)
    request_id = _request_id(body)
    name, args = body.get("name"), body.get("args")
    args = {} if args is None else args
    if not isinstance(name, str) or not isinstance(args, Mapping):
        problem = (
            f"command name must be a string, got {type(name).__name__}"
            if not isinstance(name, str)
            else f"args of {name!r} must be a JSON object, got {type(args).__name__}"
        )
        shown = name if isinstance(name, str) else None
        raise ProtocolError(problem, reply=reply_body(request_id, shown, error=problem))
    return CommandRequest(request_id, to, name, dict(args))


def reply_body(
    request_id: str | int | None, name: str | None, result: Any = None, *, error: str | None = None
) -> dict[str, Any]:
    """The body of a ``"reply"`` frame: ``{"id", "name", "ok": true, "result"}``.

    With ``error`` given: ``{"id", "name", "ok": false, "error"}``.
    """
    if error is not None:
        return {"id": request_id, "name": name, "ok": False, "error": str(error)}
    return {"id": request_id, "name": name, "ok": True, "result": result}


@_logs_refusals("reply")
def parse_reply(body: Any) -> Reply:
    """Check a reply body; :class:`ProtocolError` unless it is what :func:`reply_body` builds."""
    if not isinstance(body, Mapping):
        raise ProtocolError(f"a reply body must be a JSON object, got {type(body).__name__}")
    request_id = _request_id(body)
    name, ok = body.get("name"), body.get("ok")
    if name is not None and not isinstance(name, str):
        raise ProtocolError(f"reply name must be a string, got {type(name).__name__}")
    if not isinstance(ok, bool):
        raise ProtocolError("a reply must say 'ok': true or false")
    if ok:
        if "result" not in body:
            raise ProtocolError("a successful reply must carry a 'result'")
        return Reply(request_id, name, True, result=body["result"])
    error = body.get("error")
    if not isinstance(error, str):
        raise ProtocolError("a failed reply must carry an 'error' string")
    return Reply(request_id, name, False, error=error)


def infer_body(inputs: Any, id: str | int) -> dict[str, Any]:
    """The body of an ``"infer"`` frame: ``inputs`` (see :func:`encode_inputs`) and the id."""
    body = {"id": id, "inputs": inputs}
    _request_id(body)
    return body


@_logs_refusals("infer")
def parse_infer(body: Any) -> InferRequest:
    """Check an inference request body (``inputs`` are checked by :func:`decode_inputs`)."""
    if not isinstance(body, Mapping):
        raise ProtocolError(f"an infer body must be a JSON object, got {type(body).__name__}")
    return InferRequest(_request_id(body), body.get("inputs"))


def encode_inputs(batch: npt.ArrayLike) -> dict[str, Any]:
    """A batch as JSON: ``{"b64": base64 of little-endian float32 bytes, "shape": [...]}``."""
    array = np.ascontiguousarray(batch, dtype="<f4")
    return {"b64": base64.b64encode(array.tobytes()).decode("ascii"), "shape": list(array.shape)}


def decode_inputs(inputs: Any) -> np.ndarray:
    """A float32 batch from JSON: :func:`encode_inputs`'s form, or nested lists (N x C x H x W).

    Raises :class:`ProtocolError` with a one-line message for anything else.
    """
    if isinstance(inputs, Mapping) and "b64" in inputs:
        try:
            raw = base64.b64decode(inputs["b64"], validate=True)
            shape = tuple(int(d) for d in inputs["shape"])
            return np.frombuffer(raw, dtype="<f4").reshape(shape)
        except (ValueError, TypeError, KeyError) as err:
            raise ProtocolError(
                f"bad b64 inputs ({err}); send float32 bytes and their shape"
            ) from None
    if not isinstance(inputs, list):
        raise ProtocolError("inputs must be a nested list (N x C x H x W) or {'b64', 'shape'}")
    try:
        return np.asarray(inputs, dtype=np.float32)
    except (ValueError, TypeError) as err:
        raise ProtocolError(f"inputs are not a rectangular array of numbers ({err})") from None


def deploy_args(
    name: str, version: str, sha256: str, timeout_s: float | None = None
) -> dict[str, Any]:
    """The ``args`` of a ``deploy`` command (``timeout_s``: how long the device waits)."""
    args: dict[str, Any] = {"name": name, "version": version, "sha256": sha256}
    if timeout_s is not None:
        args["timeout_s"] = timeout_s
    parse_deploy_args(args)
    return args


def parse_deploy_args(args: Mapping[str, Any]) -> DeployArgs:
    """Check ``deploy`` args; :class:`ProtocolError` names what is missing or wrong."""
    name, version, digest = args.get("name"), args.get("version"), args.get("sha256")
    strings = isinstance(name, str) and isinstance(version, str) and isinstance(digest, str)
    if not (strings and name and version and digest):
        raise ProtocolError("deploy needs string args name, version and sha256")
    validate_name(name, "artifact name")
    validate_name(version, "artifact version")
    if len(digest) != 64 or not _HEX_RE.fullmatch(digest):
        raise ProtocolError("deploy sha256 must be 64 lowercase hex characters")
    timeout = args.get("timeout_s", _DEFAULT_DEPLOY_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ProtocolError(f"deploy timeout_s must be a positive number, got {timeout!r}")
    return DeployArgs(name, version, digest, float(timeout))


def artifact_messages(
    topics: Topics,
    data: bytes,
    *,
    name: str,
    version: str,
    sender: str,
    keyring: Keyring,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """What publishing an artifact takes: the ``deploy`` args, and ``(topic, chunk)`` messages.

    ``data`` (the artifact's .tar bytes) is sealed as one ``"artifact"`` frame whose header
    names it and holds its SHA-256, cut by :func:`split_chunks`; chunk ``i`` goes to
    :meth:`Topics.artifact_chunk`, to be published retained.
    """
    digest = hashlib.sha256(data).hexdigest()
    args = deploy_args(name, version, digest)
    frame = seal_binary(FrameKind.ARTIFACT, args, data, sender=sender, keyring=keyring)
    chunks = split_chunks(frame, chunk_bytes=chunk_bytes, sender=sender, keyring=keyring)
    messages = [(topics.artifact_chunk(name, version, i), c) for i, c in enumerate(chunks)]
    return args, messages


def gossip_extra(model: str, round: int, samples: int) -> dict[str, Any]:
    """The header fields of a model push (``extra`` of :func:`seal_tensors`).

    ``model`` names the network (peers drop models of another), ``round`` the sender's learning
    round, ``samples`` how many training samples it has (the weight of its model in a merge).
    """
    return {"round": round, "samples": samples, "model": model}


def gossip_info(frame: Frame) -> GossipInfo:
    """:func:`gossip_extra`'s fields of a gossip frame; a missing or bad ``samples`` counts 1."""
    header = frame.header
    model, round_ = header.get("model"), header.get("round")
    samples = header.get("samples", 1)
    valid = isinstance(samples, (int, float)) and not isinstance(samples, bool) and samples > 0
    return GossipInfo(
        model if isinstance(model, str) else None,
        round_ if _is_int(round_) else None,
        float(samples) if valid and math.isfinite(samples) else 1.0,
    )


def expect_json(frame: Frame, kind: str) -> dict[str, Any]:
    """The JSON body of ``frame`` if it is a JSON frame of type ``kind``, else ProtocolError."""
    if frame.type != kind or frame.binary:
        raise _wrong_kind(frame, "JSON", kind)
    return frame.header


def expect_binary(frame: Frame, kind: str) -> Frame:
    """``frame`` if it is a binary frame of type ``kind``, else ProtocolError."""
    if frame.type != kind or not frame.binary:
        raise _wrong_kind(frame, "binary", kind)
    return frame


def _wrong_kind(frame: Frame, shape: str, kind: str) -> ProtocolError:
    got = "binary" if frame.binary else "JSON"
    err = ProtocolError(f"expected a {shape} {kind!r} frame, got a {got} {frame.type!r} frame")
    what = f"reason={err.reason} sender={frame.sender} type={frame.type}"
    log.debug("refused frame: %s: %s", what, err)
    return err


# ------------------------------------------------------------------------------------ counters


class DropCounter:
    """Thread-safe counts of dropped frames by reason, for telemetry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def count(self, reason: str, n: int = 1) -> None:
        """Add ``n`` drops for ``reason``."""
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + n

    def snapshot(self) -> dict[str, int]:
        """Every reason of :data:`DROP_REASONS` (zero if none) plus any other reason counted."""
        with self._lock:
            return {**dict.fromkeys(DROP_REASONS, 0), **self._counts}

    @property
    def total(self) -> int:
        """All drops, whatever the reason."""
        with self._lock:
            return sum(self._counts.values())


# ------------------------------------------------------------------------------------- tensors


def check_tensors(
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[tuple[int, ...], npt.DTypeLike]] | None = None,
) -> None:
    """Raise ``FrameRejected("bad_tensor")`` unless ``tensors`` fit the model and are finite.

    With ``expected`` (``name -> (shape, dtype)``) the names must match exactly, every shape
    must match, and every dtype must be of the same kind (float, integer or boolean: the codecs
    decode every float tensor as float32, so widths are not compared). Float tensors may never
    hold NaN or Inf, with or without ``expected``.
    """
    if expected is not None:
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise FrameRejected(
                "bad_tensor", f"names differ: missing {_few(missing)}, extra {_few(extra)}"
            )
    for name, array in tensors.items():
        array = np.asarray(array)
        if expected is not None:
            shape, dtype = expected[name]
            if tuple(array.shape) != tuple(shape):
                raise FrameRejected(
                    "bad_tensor", f"tensor {name!r}: shape {array.shape}, expected {tuple(shape)}"
                )
            want = np.dtype(dtype)
            if _kind(array.dtype) != _kind(want):
                raise FrameRejected(
                    "bad_tensor", f"tensor {name!r}: dtype {array.dtype}, expected {want}"
                )
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise FrameRejected("bad_tensor", f"tensor {name!r} holds NaN or Inf")


def _kind(dtype: np.dtype) -> str:
    """``"float"``, ``"int"`` (signed or unsigned), ``"bool"``, or numpy's kind letter."""
    return {"f": "float", "i": "int", "u": "int", "b": "bool"}.get(dtype.kind, dtype.kind)


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]"


# ------------------------------------------------------------------------------------- chunking


def split_chunks(
    payload: bytes,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    sender: str,
    keyring: Keyring,
    transfer_id: str | None = None,
    now: float | None = None,
) -> list[bytes]:
    """Cut ``payload`` (a sealed frame) into signed ``"chunk"`` frames of at most ``chunk_bytes``.

    A payload that fits is returned unchanged as ``[payload]``. Otherwise piece ``i`` of ``n``
    becomes a binary frame whose header is ``{"transfer", "index", "total", "size", "sha256"}``
    (the transfer id, random unless given; the size and SHA-256 of the whole payload) and whose
    body is the slice; each frame is at most ``chunk_bytes + 1024`` bytes.
    """
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ProtocolError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
    payload = bytes(payload)
    if len(payload) <= chunk_bytes:
        return [payload]
    transfer = secrets.token_hex(16) if transfer_id is None else transfer_id
    validate_name(transfer, "transfer id")
    total = -(-len(payload) // chunk_bytes)
    digest = hashlib.sha256(payload).hexdigest()
    frames = []
    for index in range(total):
        piece = payload[index * chunk_bytes : (index + 1) * chunk_bytes]
        header = {
            "transfer": transfer,
            "index": index,
            "total": total,
            "size": len(payload),
            "sha256": digest,
        }
        frame = seal_binary(_CHUNK, header, piece, sender=sender, keyring=keyring, now=now)
        if len(frame) > chunk_bytes + _CHUNK_OVERHEAD:  # only a huge sender name could do this
            raise ProtocolError(f"chunk frame of {len(frame)} bytes exceeds its budget")
        frames.append(frame)
    return frames


@dataclass
class _Transfer:
    sender: str
    total: int
    size: int
    sha256: str
    last_seen: float
    chunks: dict[int, bytes] = field(default_factory=dict)
    nbytes: int = 0


def _chunk_fields(frame: Frame) -> tuple[str, int, int, int, str]:
    """``(transfer, index, total, size, sha256)`` of a chunk frame, checked for type and range."""
    if frame.type != _CHUNK or not frame.binary:
        raise FrameRejected("malformed", f"not a chunk frame: {frame.type!r}")
    h = frame.header
    transfer, index, total, size, digest = (
        h.get(k) for k in ("transfer", "index", "total", "size", "sha256")
    )
    if not isinstance(transfer, str) or not _NAME_RE.fullmatch(transfer):
        raise FrameRejected("malformed", "chunk: bad transfer id")
    if not (_is_int(index) and _is_int(total) and _is_int(size)):
        raise FrameRejected("malformed", "chunk: index, total and size must be integers")
    if not isinstance(digest, str) or len(digest) != 64 or not _HEX_RE.fullmatch(digest):
        raise FrameRejected("malformed", "chunk: sha256 must be 64 lowercase hex characters")
    if not (size >= 1 and 1 <= total <= size and 0 <= index < total):
        raise FrameRejected("malformed", f"chunk: index {index} of {total}, size {size}")
    if not frame.body:
        raise FrameRejected("malformed", "chunk: empty body")
    return transfer, index, total, size, digest


class Reassembler:
    """Puts chunked payloads back together, within a memory and time budget.

    Transfers are keyed by ``(sender, transfer id)``. Every chunk must repeat the transfer's
    ``total``, ``size`` and ``sha256``; a repeated index is ignored, and so is a late chunk of a
    transfer that completed recently (a sender's retry). The completed payload is checked
    against ``size`` and ``sha256`` before it is returned.

    Args:
        timeout_s: a transfer idle for longer is dropped by :meth:`expire`.
        max_bytes: most payload bytes held across all transfers, and the largest transfer.
        max_transfers: most transfers in progress at once.
        clock: monotonic seconds.
        drops: if given, every expired transfer is counted there as ``"chunk_timeout"``
            (including those :meth:`add` expires), so callers need not count them again.
    """

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        max_bytes: int = 64 * 1024 * 1024,
        max_transfers: int = 64,
        clock: Callable[[], float] = time.monotonic,
        drops: DropCounter | None = None,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.max_bytes = int(max_bytes)
        self.max_transfers = int(max_transfers)
        self._clock = clock
        self._drops = drops
        self._lock = threading.Lock()
        self._transfers: dict[tuple[str, str], _Transfer] = {}
        self._pending = 0
        # Recently completed (sender, transfer, sha256): late duplicates of their chunks are
        # ignored instead of starting a transfer that could only time out.
        self._done: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._done_capacity = max(16, 4 * self.max_transfers)

    @property
    def pending_bytes(self) -> int:
        """Payload bytes held by incomplete transfers."""
        with self._lock:
            return self._pending

    def __len__(self) -> int:
        with self._lock:
            return len(self._transfers)

    def expire(self) -> int:
        """Drop transfers idle for longer than ``timeout_s``; returns how many."""
        with self._lock:
            return self._expire(self._clock())

    def _expire(self, now: float) -> int:
        old = [k for k, t in self._transfers.items() if now - t.last_seen > self.timeout_s]
        for key in old:
            transfer = self._transfers[key]
            log.debug(
                "dropped transfer: reason=chunk_timeout sender=%s: transfer %s idle over %.0f s "
                "with %d of %d chunks",
                key[0],
                key[1],
                self.timeout_s,
                len(transfer.chunks),
                transfer.total,
            )
            self._drop(key)
        if old and self._drops is not None:
            self._drops.count("chunk_timeout", len(old))
        return len(old)

    def _drop(self, key: tuple[str, str]) -> None:
        transfer = self._transfers.pop(key, None)
        if transfer is not None:
            self._pending -= transfer.nbytes

    def add(self, frame: Frame) -> bytes | None:
        """Take one verified chunk frame; the whole payload once complete, else ``None``.

        Raises ``FrameRejected("chunk_overflow")`` when the chunk would exceed ``max_bytes`` or
        ``max_transfers`` (or declares a bigger payload than ``max_bytes``), and
        ``FrameRejected("malformed")`` for a chunk that contradicts its transfer or a payload
        whose size or SHA-256 does not match; both drop the transfer concerned.
        """
        tid, index, total, size, digest = _chunk_fields(frame)
        key = (frame.sender, tid)
        with self._lock:
            now = self._clock()
            self._expire(now)
            if (frame.sender, tid, digest) in self._done:
                return None
            if size > self.max_bytes:
                self._drop(key)
                raise FrameRejected(
                    "chunk_overflow", f"transfer of {size} bytes exceeds {self.max_bytes}"
                )
            transfer = self._transfers.get(key)
            if transfer is None:
                if len(self._transfers) >= self.max_transfers:
                    raise FrameRejected(
                        "chunk_overflow", f"{self.max_transfers} transfers already in progress"
                    )
                transfer = _Transfer(frame.sender, total, size, digest, now)
            elif (transfer.sender, transfer.total, transfer.size, transfer.sha256) != (
                frame.sender,
                total,
                size,
                digest,
            ):
                self._drop(key)
                raise FrameRejected("malformed", f"chunk {index} contradicts transfer {tid!r}")
            transfer.last_seen = now
            if index in transfer.chunks:
                return None
            if transfer.nbytes + len(frame.body) > size:
                self._drop(key)
                raise FrameRejected("malformed", f"transfer {tid!r} holds more than {size} bytes")
            if self._pending + len(frame.body) > self.max_bytes:
                self._drop(key)
                raise FrameRejected(
                    "chunk_overflow", f"reassembly buffer full ({self._pending} bytes pending)"
                )
            self._transfers[key] = transfer
            transfer.chunks[index] = frame.body
            transfer.nbytes += len(frame.body)
            self._pending += len(frame.body)
            if len(transfer.chunks) < total:
                return None
            self._drop(key)
            self._done[(frame.sender, tid, digest)] = None
            while len(self._done) > self._done_capacity:
                self._done.popitem(last=False)
        payload = b"".join(transfer.chunks[i] for i in range(total))
        if len(payload) != size or hashlib.sha256(payload).hexdigest() != digest:
            raise FrameRejected("malformed", f"transfer {tid!r}: size or sha256 mismatch")
        return payload


# ------------------------------------------------------------------------------------ verifying


class _NonceCache:
    """Nonces of accepted frames, forgotten once their frames would be stale anyway.

    Bounded: when full it forgets the nonce of the oldest frame and raises a floor, so any frame
    at least that old is treated as replayed from then on (it cannot be proven fresh). Not
    locked; :class:`FrameVerifier` holds the lock.
    """

    def __init__(self, capacity: int, max_age_s: float) -> None:
        self.capacity = max(1, int(capacity))
        self.max_age_s = max_age_s
        self._seen: set[tuple[str, str]] = set()
        self._heap: list[tuple[float, tuple[str, str]]] = []
        self._floor = -math.inf

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: tuple[str, str], ts: float, now: float) -> bool:
        """Record ``key``; False if it was seen (or cannot be told apart from a replay)."""
        cutoff = now - self.max_age_s
        while self._heap and self._heap[0][0] < cutoff:
            self._seen.discard(heapq.heappop(self._heap)[1])
        if key in self._seen or ts <= self._floor:
            return False
        while len(self._seen) >= self.capacity:
            oldest, forgotten = heapq.heappop(self._heap)
            self._seen.discard(forgotten)
            self._floor = max(self._floor, oldest)
        self._seen.add(key)
        heapq.heappush(self._heap, (ts, key))
        return True


def _is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(data: bytes, what: str) -> dict[str, Any]:
    r"""A JSON object from UTF-8 bytes, or ``FrameRejected("malformed")``.

    Refused: invalid UTF-8, NaN/Infinity, and strings holding a lone surrogate (``"\ud800"``),
    which no UTF-8 text can hold and no reply could echo.
    """
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        if b"\\u" in data:  # only a \u escape can smuggle in a lone surrogate
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise FrameRejected("malformed", f"{what}: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameRejected("malformed", f"{what} is not a JSON object")
    return obj


def _check_version(obj: Mapping[str, Any], what: str) -> None:
    """``FrameRejected``: ``"malformed"`` without an integer ``v``, ``"version"`` for another."""
    v = obj.get("v")
    if not _is_int(v):
        raise FrameRejected("malformed", f"{what}: missing or non-integer version 'v'")
    if v != SCHEMA_VERSION:
        raise FrameRejected(
            "version", f"{what} of version {v}, this receiver speaks {SCHEMA_VERSION}"
        )


def _check_sender(sender: Any) -> str:
    if not isinstance(sender, str) or not _NAME_RE.fullmatch(sender):
        raise FrameRejected("malformed", "missing or invalid 'sender'")
    return sender


def _check_fields(obj: Mapping[str, Any]) -> tuple[str, float, str]:
    """The other envelope fields of a verified frame, checked: ``(type, ts, nonce)``."""
    ftype, ts, nonce = (obj.get(k) for k in ("type", "ts", "nonce"))
    if not isinstance(ftype, str) or not _NAME_RE.fullmatch(ftype):
        raise FrameRejected("malformed", "missing or invalid 'type'")
    try:
        when = float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else math.nan
    except OverflowError:  # an integer beyond any float
        when = math.nan
    if not math.isfinite(when):
        raise FrameRejected("malformed", "missing or non-numeric timestamp 'ts'")
    if not isinstance(nonce, str) or len(nonce) != 2 * _NONCE_BYTES or not _HEX_RE.fullmatch(nonce):
        raise FrameRejected("malformed", "nonce must be 32 lowercase hex characters")
    return ftype, when, nonce


def _rejected(reason: str, detail: str, frame: Frame) -> FrameRejected:
    exc = FrameRejected(reason, detail)
    exc.sender, exc.frame_type = frame.sender, frame.type
    return exc


class FrameVerifier:
    """Opens frames from the network: parses, authenticates and dates them, and drops replays.

    One verifier per receiving process: it owns the replay cache, the reassembler of chunked
    transfers and the :attr:`drops` counter. Every ``FrameRejected`` its methods raise is counted
    in :attr:`drops` before it propagates, so callers must not count it again. It is
    thread-safe: paho calls back from its network thread.

    Args:
        keyring: keys to verify signatures with.
        max_age_s: frames older than this are ``"stale"``; also how long nonces are kept.
        max_future_s: frames dated further ahead than this are ``"future"`` (clock skew).
        max_frame_bytes: bigger frames are ``"oversized"``, checked before parsing.
        nonce_capacity: most nonces remembered; see the note on the replay cache below.
        clock: wall-clock unix seconds, the time frames are dated against.
        reassembly_timeout_s: chunked transfers idle longer are dropped (``"chunk_timeout"``).
        reassembly_max_bytes: memory for chunked transfers, and the largest reassembled frame.

    The replay cache forgets a nonce once its frame is older than ``max_age_s`` (a replay of it
    would be stale). If ``nonce_capacity`` frames arrive within ``max_age_s`` it forgets the
    oldest one early and from then on drops every frame at least that old as ``"replayed"``,
    since it can no longer tell.
    """

    def __init__(
        self,
        keyring: Keyring,
        *,
        max_age_s: float = 120.0,
        max_future_s: float = 30.0,
        max_frame_bytes: int = 2 * 1024 * 1024,
        nonce_capacity: int = 100_000,
        clock: Callable[[], float] = time.time,
        reassembly_timeout_s: float = 30.0,
        reassembly_max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.keyring = keyring
        self.max_age_s = float(max_age_s)
        self.max_future_s = float(max_future_s)
        self.max_frame_bytes = int(max_frame_bytes)
        self._clock = clock
        self._lock = threading.Lock()
        self._nonces = _NonceCache(nonce_capacity, self.max_age_s)
        self.drops = DropCounter()
        self.reassembler = Reassembler(
            timeout_s=reassembly_timeout_s, max_bytes=reassembly_max_bytes, drops=self.drops
        )

    def open(self, payload: bytes, *, retained: bool = False, topic: str | None = None) -> Frame:
        """Parse and verify one frame; raises :class:`FrameRejected` if it must be dropped.

        ``retained=True`` is for retained messages (MQTT ``msg.retain``, e.g. ``state`` and its
        last will), which the broker hands out again, long after they were sealed: their age and
        nonce are not checked (everything else is), so compare ``ts`` with the newest frame seen
        from that sender before acting on one. ``topic``, where given, is named in the debug log
        line of a dropped frame.
        """
        try:
            return self._open(payload, self.max_frame_bytes, fresh=not retained)
        except FrameRejected as exc:
            self._dropped(exc, topic)
            raise

    def open_tensors(
        self,
        payload: bytes | Frame,
        expected: Mapping[str, tuple[tuple[int, ...], npt.DTypeLike]] | None = None,
        *,
        topic: str | None = None,
    ) -> tuple[Frame, dict[str, np.ndarray]]:
        """Open a ``"gossip"`` frame and decode its tensors, checked with :func:`check_tensors`.

        ``payload`` is raw bytes, or a gossip :class:`Frame` that :meth:`receive` already
        opened (a model big enough to be chunked). Returns the frame and the tensors.
        """
        frame: Frame | None = None
        try:
            opened = payload if isinstance(payload, Frame) else self._open(payload)
            frame = opened
            return opened, self._tensors(opened, expected)
        except FrameRejected as exc:
            if frame is not None and exc.sender is None:
                exc.sender, exc.frame_type = frame.sender, frame.type
            self._dropped(exc, topic)
            raise

    def receive(
        self, payload: bytes, *, retained: bool = False, topic: str | None = None
    ) -> Frame | None:
        """Open a frame, reassembling chunked ones: the frame, or ``None`` while incomplete.

        A chunk frame feeds :attr:`reassembler`; when its transfer completes, the payload (a
        complete signed frame of its own, up to ``reassembly_max_bytes``) is opened like any
        other frame and returned. Every other frame is returned as :meth:`open` returns it.
        ``retained=True`` is for retained chunks (an artifact's): as in :meth:`open`, neither
        the chunks' nor the inner frame's age and nonce are checked.
        """
        fresh = not retained
        frame: Frame | None = None
        try:
            frame = self._open(payload, fresh=fresh)
            if frame.type != _CHUNK:
                return frame
            whole = self.reassembler.add(frame)
            if whole is None:
                return None
            frame = None  # what fails from here on is the inner frame
            inner = self._open(whole, self.reassembler.max_bytes, fresh=fresh)
            if inner.type == _CHUNK:
                raise _rejected("malformed", "a chunked transfer holds another chunk", inner)
            return inner
        except FrameRejected as exc:
            if frame is not None and exc.sender is None:
                exc.sender, exc.frame_type = frame.sender, frame.type
            self._dropped(exc, topic)
            raise

    def _dropped(self, exc: FrameRejected, topic: str | None) -> None:
        """Count a dropped frame, and say why on the debug log."""
        self.drops.count(exc.reason)
        if log.isEnabledFor(logging.DEBUG):
            known = [("sender", exc.sender), ("type", exc.frame_type), ("topic", topic)]
            where = "".join(f" {k}={v}" for k, v in known if v is not None)
            log.debug("dropped frame: reason=%s%s: %s", exc.reason, where, exc.detail)

    # The checks themselves; they raise FrameRejected and count nothing.

    def _tensors(
        self,
        frame: Frame,
        expected: Mapping[str, tuple[tuple[int, ...], npt.DTypeLike]] | None,
    ) -> dict[str, np.ndarray]:
        if frame.type != _GOSSIP or not frame.binary:
            raise FrameRejected("malformed", f"expected a binary gossip frame, got {frame.type!r}")
        if frame.header.get("codec") not in CODECS:
            raise FrameRejected("malformed", f"unknown codec {frame.header.get('codec')!r}")
        try:
            tensors = decode(frame.body)
        except CodecError as exc:
            raise FrameRejected("malformed", str(exc)) from None
        check_tensors(tensors, expected)
        return tensors

    def _open(self, payload: bytes, limit: int | None = None, fresh: bool = True) -> Frame:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise FrameRejected("malformed", f"payload must be bytes, got {type(payload).__name__}")
        limit = self.max_frame_bytes if limit is None else limit
        if len(payload) > limit:
            raise FrameRejected("oversized", f"{len(payload)} bytes, limit {limit}")
        payload = bytes(payload)
        if payload[:4] == MAGIC:
            frame = self._open_binary(payload)
        elif payload[: len(_MAGIC_FAMILY)] == _MAGIC_FAMILY:
            raise FrameRejected(
                "version", f"binary frame layout {payload[:4]!r}, this receiver speaks {MAGIC!r}"
            )
        elif payload.lstrip(_JSON_WHITESPACE)[:1] == b"{":
            frame = self._open_json(payload)
        else:
            raise FrameRejected("malformed", f"unknown frame start {payload[:4]!r}")
        now = self._clock()
        if fresh and frame.ts < now - self.max_age_s:
            raise _rejected("stale", f"{now - frame.ts:.1f} s old", frame)
        if frame.ts > now + self.max_future_s:
            raise _rejected("future", f"dated {frame.ts - now:.1f} s ahead", frame)
        if fresh:
            with self._lock:
                if not self._nonces.add((frame.sender, frame.nonce), frame.ts, now):
                    raise _rejected("replayed", f"nonce {frame.nonce} seen before", frame)
        return frame

    def _open_json(self, payload: bytes) -> Frame:
        """A JSON frame: read the wrapper, verify ``sig`` over ``payload``, then parse it."""
        wrapper = _loads(payload, "JSON frame")
        _check_version(wrapper, "JSON frame")
        unknown = sorted(set(wrapper) - _WRAPPER_KEYS)
        if unknown:
            raise FrameRejected("malformed", f"unknown fields {_few(unknown)}")
        sender = _check_sender(wrapper.get("sender"))
        ftype: str | None = None
        try:
            text, sig = wrapper.get("payload"), wrapper.get("sig")
            if not isinstance(text, str):
                raise FrameRejected("malformed", "'payload' must be a JSON string")
            if sig is not None and not isinstance(sig, str):
                raise FrameRejected("malformed", "'sig' must be a hex string")
            if sig and (len(sig) != 2 * _MAC_BYTES or not _SIG_RE.fullmatch(sig)):
                raise FrameRejected("malformed", "'sig' must be 64 hex characters")
            if not sig:
                raise FrameRejected("unsigned", "no 'sig'")
            try:
                signed = text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800") has no UTF-8 bytes
                raise FrameRejected("malformed", "'payload' is not valid Unicode") from None
            expected = hmac.new(self.keyring.key_for(sender), signed, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(sig.lower(), expected):
                raise FrameRejected("forged", "bad signature")
            # Signed by the key of `sender`: only now is the payload parsed.
            inner = _loads(signed, "JSON frame payload")
            claimed = inner.get("type")
            ftype = claimed if isinstance(claimed, str) and _NAME_RE.fullmatch(claimed) else None
            _check_version(inner, "payload")
            named = _check_sender(inner.get("sender"))
            ftype, ts, nonce = _check_fields(inner)
            if named != sender:
                raise FrameRejected("forged", f"signed as {sender!r}, the payload names {named!r}")
            unknown = sorted(set(inner) - _JSON_KEYS)
            if unknown:
                raise FrameRejected("malformed", f"unknown payload fields {_few(unknown)}")
            body = inner.get("body")
            if not isinstance(body, dict):
                raise FrameRejected("malformed", "'body' must be a JSON object")
        except FrameRejected as exc:
            exc.sender, exc.frame_type = sender, ftype
            raise
        return Frame(SCHEMA_VERSION, ftype, sender, ts, nonce, body)

    def _open_binary(self, payload: bytes) -> Frame:
        """A binary frame: read the header's version and sender, verify the HMAC, then the rest."""
        if len(payload) < len(MAGIC) + _LEN.size + _MAC_BYTES:
            raise FrameRejected("malformed", f"binary frame of {len(payload)} bytes is too short")
        (hlen,) = _LEN.unpack_from(payload, len(MAGIC))
        start = len(MAGIC) + _LEN.size
        end = start + hlen
        if end > len(payload) - _MAC_BYTES:
            raise FrameRejected(
                "malformed", f"header length {hlen} overruns a {len(payload)}-byte frame"
            )
        header = _loads(payload[start:end], "binary frame header")
        _check_version(header, "binary frame")
        sender = _check_sender(header.get("sender"))
        claimed = header.get("type")
        ftype = claimed if isinstance(claimed, str) and _NAME_RE.fullmatch(claimed) else None
        try:
            signed, sig = payload[:-_MAC_BYTES], payload[-_MAC_BYTES:]
            if sig == bytes(_MAC_BYTES):
                raise FrameRejected("unsigned", "all-zero MAC")
            expected = hmac.new(self.keyring.key_for(sender), signed, hashlib.sha256).digest()
            if not hmac.compare_digest(sig, expected):
                raise FrameRejected("forged", "bad signature")
            ftype, ts, nonce = _check_fields(header)
        except FrameRejected as exc:
            exc.sender, exc.frame_type = sender, ftype
            raise
        fields = {k: v for k, v in header.items() if k not in _ENVELOPE}
        return Frame(
            SCHEMA_VERSION, ftype, sender, ts, nonce, fields, payload[end:-_MAC_BYTES], True
        )


def _one_line(text: object, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
