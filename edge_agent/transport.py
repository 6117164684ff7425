"""One MQTT connection for the agent and the laptop: connect, subscribe, publish, survive.

:class:`MqttTransport` wraps one paho-mqtt 2.x client (``CallbackAPIVersion.VERSION2``) whose
network loop runs in its own thread (``loop_start``). It knows nothing of bitfleet's topics or
frames (that is :mod:`edge_agent.protocol`); it moves bytes and keeps the connection alive::

    from edge_agent.transport import MqttTransport

    t = MqttTransport(url="mqtt://127.0.0.1:1883", client_id="pi-01",
                      will=("bitfleet/demo/dev/pi-01/state", b'{"online":false}', 1, True))
    t.subscribe("bitfleet/demo/dev/pi-01/cmd", on_cmd)        # on_cmd(topic, payload)
    t.add_connect_hook(lambda: t.publish(state_topic, online, retain=True))
    t.connect(timeout=10)                                       # TransportError if it cannot
    t.publish("bitfleet/demo/dev/pi-01/telemetry", b"{...}", qos=0)
    t.close()                                                   # clean: the will is not sent

What it guarantees:

- **Reconnects on its own.** After a lost connection paho retries with exponential backoff
  (``reconnect_min_s`` doubling up to ``reconnect_max_s``). Sessions are clean (MQTT 3.1.1
  ``clean_session``, MQTT 5 ``clean_start``): the broker keeps nothing for an offline device,
  so a Pi back after a day gets no backlog of stale gossip. Every remembered subscription is
  therefore sent again on *every* connect, and then the connect hooks run (the agent re-publishes
  its retained online state there: a broker without persistence forgot it, and the last will may
  have replaced it with ``offline``). ``connect_count`` counts successful connects.
- **Handlers cannot kill the network thread.** A message goes to the handler of every
  subscribed filter that matches its topic (``topic_matches_sub``), in the network thread, so a
  handler should be quick and hand heavy work to a queue. An exception in a handler or a hook
  is logged with its traceback and counted (``handler_errors``, ``hook_errors``), never raised.
- **Publishing is fire-and-forget or confirmed.** :meth:`~MqttTransport.publish` never blocks
  and never raises for connectivity: QoS 1/2 messages published while offline wait in a bounded
  queue (``max_queued``) and go out after the reconnect; QoS 0 messages, and messages beyond the
  queue, are dropped and counted in ``dropped_publishes``. :meth:`~MqttTransport.publish_and_wait`
  returns only once the broker acknowledged the message and raises :class:`TransportError`
  otherwise. :meth:`~MqttTransport.publish_many` sends a burst (a model's chunks to several
  peers) with at most half the queue unacknowledged, so nothing is dropped however many chunks
  there are. A payload above ``max_packet_bytes`` (default 1,000,000, under the 1 MiB packet
  limit of common broker setups with room for the header) raises ``ValueError``: chunking is
  the caller's job.
- **Small messages go out at once.** The socket has ``TCP_NODELAY`` (``tcp_nodelay=True``):
  with Nagle's algorithm a reply that follows unacknowledged data waits ~40 ms for the peer's
  delayed ACK. Brokers need ``set_tcp_nodelay true`` as well (``ops/mosquitto``).
- **Errors are one line.** A bad URL or option raises ``ValueError`` at construction; a broker
  that cannot be reached, or refuses the credentials, raises :class:`TransportError` naming the
  broker and the reason.

Last will: the broker publishes ``will`` when the connection ends *without* a DISCONNECT packet
(crash, kill -9, network loss once the keepalive expires, about 1.5 x ``keepalive`` seconds).
``close()`` sends DISCONNECT, so the will is *not* published, as MQTT specifies: publish the
offline state yourself before closing. ``close(clean=False)`` drops the socket instead, as a
crash would, and the broker publishes the will.

Broker behaviour handlers must live with (checked against Mosquitto 2.0 and amqtt 0.12):

- Retained messages arrive again after every reconnect (re-subscribing re-sends them), and
  amqtt may deliver one twice: handlers of retained topics must be idempotent.
- Overlapping filters (``bitfleet/demo/#`` and ``bitfleet/demo/dev/pi-01/cmd``): Mosquitto sends
  an MQTT 3.1.1 client one copy, but an MQTT 5 client, and amqtt any client, one copy per
  matching subscription, and every copy goes to every matching handler. Keep filters disjoint.
- A packet above the broker's maximum packet size makes the broker drop the connection; paho
  then re-sends the queued QoS 1 message after each reconnect, and the device loops, connected
  for a millisecond at a time. MQTT 5 brokers announce their limit in CONNACK and
  :meth:`~MqttTransport.publish` enforces it (``broker_max_packet``); on MQTT 3.1.1 keep
  ``max_packet_bytes`` below the broker's limit.
- A publish the broker's ACL denies is dropped silently on MQTT 3.1.1 (the PUBACK still comes);
  MQTT 5 brokers refuse it in the PUBACK, counted in ``refused_publishes`` and raised by
  :meth:`~MqttTransport.publish_and_wait`.

URLs are ``mqtt://host[:port]`` (default port 1883) or ``mqtts://host[:port]`` (TLS, default
8883; the system CAs verify the broker unless ``ca_file`` is given). Both MQTT 3.1.1 and MQTT 5
(``protocol="5"``) are supported.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from bitfleet.errors import BitfleetError

__all__ = ["Handler", "MqttTransport", "TransportError", "parse_broker_url"]

logger = logging.getLogger(__name__)

#: A message handler: ``handler(topic, payload)``.
Handler = Callable[[str, bytes], None]

_PROTOCOLS = {"3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# Bytes of a PUBLISH packet besides topic and payload: fixed header with a 4-byte remaining
# length, topic length, packet id and (MQTT 5) an empty property length, with a margin.
_PUBLISH_OVERHEAD = 16
_MAX_REFUSALS = 256  # PUBACK refusals kept for publish_and_wait to find
_MAX_ACKS = 4096  # recent acknowledged packet ids kept for publish_many to find
_FAIL_LOG_INTERVAL_S = 600.0  # while a broker stays unreachable, remind this often
_URL_FORM = "expected mqtt://host[:port] or mqtts://host[:port]"


_PAHO_NOISE = "Client is not connected"


class _PahoNoiseFilter(logging.Filter):
    """Demote paho 2.2's "Client is not connected" error, logged after every normal disconnect.

    paho logs it at ERROR level whenever its loop finds the socket already closed, which
    happens on each clean ``close()`` and each failed reconnect attempt: not an error here.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(_PAHO_NOISE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_paho_logger = logging.getLogger(f"{__name__}.paho")
_paho_logger.addFilter(_PahoNoiseFilter())


class TransportError(BitfleetError):
    """The broker could not be reached, refused us, or did not acknowledge a message."""


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """Split a broker URL into ``(host, port, tls)``; raises ``ValueError`` on anything else."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except (ValueError, AttributeError):
        raise ValueError(f"bad broker URL {url!r}: {_URL_FORM}") from None
    scheme = parts.scheme.lower()
    if (
        scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"bad broker URL {url!r}: {_URL_FORM}")
    return parts.hostname, port or _DEFAULT_PORTS[scheme], scheme == "mqtts"


def _check_filter(topic_filter: str) -> None:
    """Raise ``ValueError`` unless ``topic_filter`` is a valid MQTT topic filter."""
    levels = topic_filter.split("/") if isinstance(topic_filter, str) else []
    ok = bool(topic_filter) and "\0" not in topic_filter
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            ok = False
        if "+" in level and level != "+":
            ok = False
    if not ok:
        raise ValueError(
            f"bad topic filter {topic_filter!r}: '+' must fill a whole level and '#' must be the "
            "whole last level"
        )


def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")


class MqttTransport:
    """One paho-mqtt client with reconnects, re-subscription, connect hooks and safe handlers.

    All arguments are keyword-only.

    Args:
        url: ``mqtt://host[:port]`` or ``mqtts://host[:port]`` (TLS).
        client_id: MQTT client id; unique per broker (a second client with the same id makes
            the broker disconnect the first). The agent uses the device id.
        username: user name; with Mosquitto's shipped ACL it must equal the device id.
        password: password (needs ``username``).
        ca_file: CA certificate(s) that verify the broker (PEM); system CAs when omitted.
        cert_file: client certificate (PEM), for brokers that authenticate clients by TLS.
        key_file: the client certificate's private key (PEM).
        insecure_tls: skip checking that the broker's certificate names its host (the chain is
            still verified against ``ca_file``), like ``mosquitto_pub --insecure``: for brokers
            reached by an IP address that their certificate does not list.
        protocol: ``"3.1.1"`` or ``"5"``.
        keepalive: seconds between pings when idle; the broker declares the client dead (and
            sends its will) after about 1.5 times this without traffic.
        will: last will ``(topic, payload, qos, retain)``, published by the broker if the
            connection ends without a DISCONNECT.
        reconnect_min_s: first delay before reconnecting after a loss; doubles on each failure.
        reconnect_max_s: cap of that delay.
        max_packet_bytes: largest payload :meth:`publish` accepts.
        max_queued: QoS 1/2 messages kept while offline (and in flight); beyond that, publishes
            are dropped and counted, so a long outage cannot exhaust a small device's memory.
            :meth:`publish_many` keeps its bursts within half of it.
        tcp_nodelay: set ``TCP_NODELAY`` on the socket. Without it a small publish that follows
            unacknowledged data waits for the peer's delayed ACK (about 40 ms on Linux), so
            every request/reply hop costs ~44 ms; the broker needs ``set_tcp_nodelay true`` too.
    """

    def __init__(
        self,
        *,
        url: str,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        insecure_tls: bool = False,
        protocol: str = "3.1.1",
        keepalive: int = 30,
        will: tuple[str, bytes, int, bool] | None = None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        max_packet_bytes: int = 1_000_000,
        max_queued: int = 100,
        tcp_nodelay: bool = True,
    ) -> None:
        self.host, self.port, self.tls = parse_broker_url(url)
        self.url = url.strip()
        if not isinstance(client_id, str) or not client_id:
            raise ValueError("client_id must be a non-empty string")
        if protocol not in _PROTOCOLS:
            raise ValueError(f"unknown MQTT protocol {protocol!r}; valid: {', '.join(_PROTOCOLS)}")
        if password is not None and not username:
            raise ValueError("a password needs a username")
        if (ca_file or cert_file or key_file or insecure_tls) and not self.tls:
            raise ValueError(
                f"TLS options given but {self.url!r} is not an mqtts:// URL; use mqtts://host:8883"
            )
        if keepalive < 1:
            raise ValueError(f"keepalive must be at least 1 second, got {keepalive!r}")
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if max_packet_bytes < 1 or max_queued < 1:
            raise ValueError("max_packet_bytes and max_queued must be positive")

        self.client_id = client_id
        self.protocol = protocol
        self.keepalive = int(keepalive)
        self.max_packet_bytes = int(max_packet_bytes)
        self.max_queued = int(max_queued)
        self.tcp_nodelay = bool(tcp_nodelay)
        #: Callables run in the network thread after every successful (re)connect.
        self.on_connect_hooks: list[Callable[[], None]] = []
        #: Successful connects so far (a reconnect adds one).
        self.connect_count = 0
        #: Exceptions raised by message handlers (logged, never propagated).
        self.handler_errors = 0
        #: Exceptions raised by connect hooks (logged, never propagated).
        self.hook_errors = 0
        #: Publishes dropped: QoS 0 while offline, or the offline queue was full.
        self.dropped_publishes = 0
        #: Why the last connection attempt failed or the last connection ended, if it did.
        self.last_error: str | None = None
        #: The broker's Maximum Packet Size from its MQTT 5 CONNACK (None: not announced).
        self.broker_max_packet: int | None = None
        #: Publishes the broker refused in its PUBACK (MQTT 5 only, e.g. "Not authorized").
        self.refused_publishes = 0

        self._subs: dict[str, tuple[Handler, int]] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._pending: dict[int, list[str]] = {}  # SUBSCRIBE mid -> filters awaiting a SUBACK
        self._early_acks: set[int] = set()  # SUBACKs that beat the caller to _pending
        self._fatal: str | None = None  # a failure that retrying will not fix: fail fast
        self._refusals: OrderedDict[int, str] = OrderedDict()  # recent PUBACK refusals by mid
        # Acknowledged packet ids -> the sequence number of their ack. paho re-sends a message
        # published while offline after the reconnect but leaves its MQTTMessageInfo.rc at
        # "not connected", so publish_many tracks acks itself: a packet id counts as
        # acknowledged when its ack is newer than the publish (ids recur only every 65535).
        self._ack_seq = 0
        self._acks: OrderedDict[int, int] = OrderedDict()
        # failures of the current outage already warned about, and when the last warning was
        self._fail_logged: tuple[frozenset[str], float] = (frozenset(), 0.0)
        self._fail_count = 0  # failed attempts in the current outage
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._started = False
        self._closing = False
        self._net_thread: threading.Thread | None = None

        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=_PROTOCOLS[protocol],
            clean_session=True if protocol == "3.1.1" else None,
        )
        client.enable_logger(_paho_logger)
        client.suppress_exceptions = True  # a bug in a callback must not end the network loop
        client.reconnect_delay_set(reconnect_min_s, reconnect_max_s)  # type: ignore[arg-type]
        client.max_queued_messages_set(max_queued)
        if username:
            client.username_pw_set(username, password)
        if self.tls:
            client.tls_set(
                ca_certs=ca_file,
                certfile=cert_file,
                keyfile=key_file,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(insecure_tls)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        self._client = client
        if will is not None:
            self.set_will(*will)

    # -- connection ----------------------------------------------------------------------------

    @property
    def reconnect_delays(self) -> tuple[float, float]:
        """``(reconnect_min_s, reconnect_max_s)``: the first delay between attempts, and its cap."""
        return self._reconnect_min_s, self._reconnect_max_s

    @property
    def connected(self) -> bool:
        """Whether the client holds an accepted connection right now."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (True) or ``timeout`` seconds pass (False)."""
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float | None = None) -> bool:
        """Block until connected and every subscription is acknowledged by the broker.

        Messages published by others after this returns True reach the handlers. Returns False
        after ``timeout`` seconds.
        """
        return self._subscribed.wait(timeout)

    def connect(self, timeout: float | None = 10.0) -> None:
        """Start connecting in the background and, unless ``timeout`` is None, wait for it.

        With a timeout, raises :class:`TransportError` if the broker is not reached in time, or
        at once if it refuses the connection (bad credentials, protocol) or its TLS certificate
        fails verification; the background loop is then stopped, so the transport is as before
        the call. With ``timeout=None`` it returns at once and keeps retrying, with backoff,
        until it connects. Either way, after a connection is lost later, it reconnects on its
        own.
        """
        if not self._started:
            with self._lock:
                self._fatal = None
                self._closing = False
            clean_start: Any = True if self.protocol == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY
            self._client.connect_async(
                self.host, self.port, keepalive=self.keepalive, clean_start=clean_start
            )
            self._client.loop_start()
            self._started = True
        if timeout is None:
            return
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._connected.is_set() and self._fatal is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            fatal, ok = self._fatal, self._connected.is_set()
        if ok:
            return
        self._stop_loop()
        if fatal is not None:
            raise TransportError(fatal)
        why = self.last_error or "no answer"
        raise TransportError(f"cannot connect to broker {self.url} within {timeout:g} s: {why}")

    def close(self, clean: bool = True) -> None:
        """Disconnect and stop the network thread.

        ``clean=True`` sends DISCONNECT first (queued messages are flushed; the broker does not
        publish the last will). ``clean=False`` drops the connection the way a crash does, and
        the broker publishes the will.
        """
        if not self._started:
            return
        self._closing = True
        if clean:
            self._client.disconnect()
            self._client.loop_stop()
        else:
            # Half-close first: the broker sees the connection end without a DISCONNECT right
            # away (and publishes the will); the loop then stops before it could reconnect.
            sock = self._client.socket()
            if isinstance(sock, socket.socket):  # TLS sockets too; paho's type is wider
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._client.loop_stop()
            if sock is not None:
                sock.close()
        self._started = False
        self._mark_disconnected("closed")

    def _stop_loop(self) -> None:
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()
        self._started = False
        self._mark_disconnected(self.last_error)

    def _mark_disconnected(self, why: str | None) -> None:
        with self._cond:
            self._connected.clear()
            self._subscribed.clear()
            self._pending.clear()
            self._early_acks.clear()
            self.last_error = why
            self._cond.notify_all()

    def set_will(self, topic: str, payload: bytes, qos: int = 1, retain: bool = True) -> None:
        """Set the last will sent with the *next* CONNECT (this one's will is already set).

        The agent re-seals its ``offline`` state before every (re)connect, so the will the
        broker holds names the model that is serving, with a fresh timestamp.
        """
        if not isinstance(payload, (bytes, bytearray)):
            raise TypeError(f"will payload must be bytes, got {type(payload).__name__}")
        _check_qos(qos)
        self._client.will_set(topic, bytes(payload), qos=qos, retain=bool(retain))

    def add_connect_hook(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` after every successful (re)connect, once subscriptions are re-sent.

        Hooks run in the network thread: they may call :meth:`publish`, not
        :meth:`publish_and_wait`. If already connected, ``fn`` is not run now.
        """
        self.on_connect_hooks.append(fn)

    # -- subscriptions -------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Deliver messages matching ``topic_filter`` to ``handler(topic, payload)``.

        The subscription is remembered and sent again on every reconnect. Subscribing to the
        same filter again replaces its handler and QoS. Keep filters disjoint: with overlapping
        ones a broker may send one copy per matching subscription (see the module docstring).
        """
        _check_filter(topic_filter)
        _check_qos(qos)
        if not callable(handler):
            raise TypeError("handler must be callable as handler(topic, payload)")
        with self._lock:
            self._subs[topic_filter] = (handler, qos)
        if self._connected.is_set():
            self._send_subscribe([(topic_filter, qos)])

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget ``topic_filter`` and its handler (a filter not subscribed is ignored)."""
        with self._lock:
            known = self._subs.pop(topic_filter, None) is not None
        if known and self._connected.is_set():
            self._client.unsubscribe(topic_filter)

    @property
    def subscriptions(self) -> dict[str, int]:
        """The remembered topic filters and their QoS."""
        with self._lock:
            return {f: qos for f, (_, qos) in self._subs.items()}

    def _send_subscribe(self, filters: list[tuple[str, int]]) -> None:
        with self._lock:
            self._subscribed.clear()
        rc, mid = self._client.subscribe(filters)
        with self._cond:
            if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
                # Not connected after all: on_connect subscribes again.
                self._update_subscribed()
                return
            if mid in self._early_acks:
                self._early_acks.discard(mid)
            else:
                self._pending[mid] = [f for f, _ in filters]
            self._update_subscribed()

    def _update_subscribed(self) -> None:
        # Call with self._lock held.
        if self._connected.is_set() and not self._pending:
            self._subscribed.set()
        else:
            self._subscribed.clear()

    # -- publishing ----------------------------------------------------------------------------

    def _check_payload(self, topic: str, payload: bytes) -> bytes:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        data = bytes(payload)
        limit, name = self.max_packet_bytes, "max_packet_bytes"
        if self.broker_max_packet is not None:
            # The whole PUBLISH must fit: fixed header (<= 5 bytes), topic, packet id, properties.
            room = self.broker_max_packet - len(topic.encode("utf-8")) - _PUBLISH_OVERHEAD
            if room < limit:
                limit, name = room, "the broker's maximum packet size less the header"
        if len(data) > limit:
            raise ValueError(
                f"payload of {len(data)} bytes for {topic!r} exceeds {name} ({limit} bytes); "
                "split it into chunks"
            )
        return data

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Send ``payload`` to ``topic`` without waiting.

        Raises ``ValueError`` for a bad topic or QoS or a payload above ``max_packet_bytes``,
        never for connectivity: while offline, QoS 1/2 messages are queued (up to
        ``max_queued``) and QoS 0 messages dropped; drops are counted in ``dropped_publishes``.
        """
        _check_qos(qos)
        data = self._check_payload(topic, payload)
        info = self._client.publish(topic, data, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE or (qos == 0 and info.rc != mqtt.MQTT_ERR_SUCCESS):
            self.dropped_publishes += 1
            logger.warning(
                "%s: dropped a publish to %s (%s)",
                self.client_id,
                topic,
                mqtt.error_string(info.rc),
            )

    def publish_and_wait(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 10.0,
    ) -> None:
        """Publish and block until the broker acknowledged it (QoS 1/2) or it was sent (QoS 0).

        Waits for a connection first if there is none. Raises :class:`TransportError` when
        ``timeout`` seconds pass first; a QoS 1/2 message may still go out after a reconnect.
        Must not be called from a handler or a hook (the network thread would wait for itself).
        """
        if threading.current_thread() is self._net_thread:
            raise RuntimeError(
                "publish_and_wait() called from the MQTT network thread; use publish()"
            )
        _check_qos(qos)
        data = self._check_payload(topic, payload)
        deadline = time.monotonic() + timeout
        if not self._connected.wait(timeout):
            why = f" ({self.last_error})" if self.last_error else ""
            raise TransportError(f"not connected to broker {self.url}{why}; {topic} not sent")
        info = self._client.publish(topic, data, qos=qos, retain=retain)
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            published = info.is_published()
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"publish to {topic} on {self.url} failed: {exc}") from None
        with self._lock:
            refused = self._refusals.pop(info.mid, None) if published else None
        if refused is not None:
            raise TransportError(f"broker {self.url} refused the publish to {topic}: {refused}")
        if not published:
            raise TransportError(
                f"broker {self.url} did not acknowledge {topic} within {timeout:g} s"
            )

    def publish_many(
        self,
        messages: Iterable[tuple[str, bytes]],
        qos: int = 1,
        timeout: float = 60.0,
        window: int | None = None,
        cancel: threading.Event | None = None,
    ) -> int:
        """Publish a burst of QoS 1/2 messages, keeping at most ``window`` unacknowledged.

        :meth:`publish` drops what exceeds ``max_queued`` (which counts messages in flight),
        so a model cut into more chunks than that, pushed to several peers, would lose chunks.
        This waits for the oldest PUBACK whenever ``window`` (default half of ``max_queued``)
        messages are in flight, then for the rest. Returns the number published. Raises
        :class:`TransportError` if ``timeout`` seconds pass first (the messages already handed
        to paho may still go out after a reconnect), or as soon as ``cancel`` is set (so a
        shutdown during a broker outage does not wait out the timeout). Not from the network
        thread.
        """
        if threading.current_thread() is self._net_thread:
            raise RuntimeError("publish_many() called from the MQTT network thread; use publish()")
        if qos not in (1, 2):
            raise ValueError(f"publish_many needs QoS 1 or 2 (acknowledged), got {qos!r}")
        window = window or max(1, self.max_queued // 2)
        if not 1 <= window <= self.max_queued:
            raise ValueError(f"window must be between 1 and max_queued ({self.max_queued})")
        deadline = time.monotonic() + timeout
        in_flight: deque[tuple[str, int, int]] = deque()  # (topic, packet id, ack seq before)

        def settle_oldest() -> None:
            topic, mid, before = in_flight.popleft()
            with self._cond:
                while self._acks.get(mid, 0) <= before:
                    if cancel is not None and cancel.is_set():
                        raise TransportError(f"publishing to {topic} cancelled")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TransportError(
                            f"broker {self.url} did not acknowledge {topic} within {timeout:g} s"
                        )
                    self._cond.wait(min(0.2, left))
                refused = self._refusals.pop(mid, None)
            if refused is not None:
                raise TransportError(f"broker {self.url} refused the publish to {topic}: {refused}")

        sent = 0
        for topic, payload in messages:
            data = self._check_payload(topic, payload)
            while len(in_flight) >= window:
                settle_oldest()
            with self._lock:
                before = self._ack_seq
            info = self._client.publish(topic, data, qos=qos)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:  # someone else filled the queue meanwhile
                self.dropped_publishes += 1
                raise TransportError(
                    f"the outgoing queue ({self.max_queued} messages) is full; {topic} not sent"
                )
            in_flight.append((topic, info.mid, before))
            sent += 1
        while in_flight:
            settle_oldest()
        return sent

    # -- paho callbacks (network thread) -------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            why = str(reason_code)
            logger.warning(
                "%s: broker %s refused the connection: %s", self.client_id, self.url, why
            )
            with self._cond:
                self._fatal = f"broker {self.url} refused the connection: {why}"
                self.last_error = f"refused: {why}"
                self._cond.notify_all()
            return
        self._net_thread = threading.current_thread()
        self.broker_max_packet = getattr(properties, "MaximumPacketSize", None)
        with self._cond:
            self._pending.clear()
            self._early_acks.clear()
            filters = [(f, qos) for f, (_, qos) in self._subs.items()]
            self.connect_count += 1
            self.last_error = None
            self._fail_logged = (frozenset(), 0.0)  # the next outage is reported again
            self._fail_count = 0
            self._connected.set()
            self._update_subscribed()
            self._cond.notify_all()
        logger.info(
            "%s: connected to %s (connect #%d)", self.client_id, self.url, self.connect_count
        )
        if filters:
            self._send_subscribe(filters)
        for hook in list(self.on_connect_hooks):
            try:
                hook()
            except Exception:
                self.hook_errors += 1
                logger.exception("%s: connect hook %r failed", self.client_id, hook)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError` block: the exception is current.
        exc = sys.exc_info()[1]
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "connection failed"
        with self._cond:
            self.last_error = why
            if isinstance(exc, ssl.SSLCertVerificationError):  # a wrong CA or name stays wrong
                self._fatal = f"cannot connect to broker {self.url}: {why}"
            self._cond.notify_all()
        # Say once what fails and what happens next (the retry schedule), again for a reason not
        # seen yet in this outage, and then every _FAIL_LOG_INTERVAL_S while it lasts: a daemon
        # started before its broker must say why it is not online, without flooding its log.
        now = time.monotonic()
        self._fail_count += 1
        said, last_at = self._fail_logged
        if why not in said:
            self._fail_logged = (said | {why}, now)
            logger.warning(
                "%s: cannot reach broker %s (%s); retrying every %g s, backing off to every %g s, "
                "until it answers",
                self.client_id,
                self.url,
                why,
                self._reconnect_min_s,
                self._reconnect_max_s,
            )
        elif now - last_at >= _FAIL_LOG_INTERVAL_S:
            self._fail_logged = (said, now)
            logger.warning(
                "%s: still cannot reach broker %s after %d attempts (%s); retrying every %g s",
                self.client_id,
                self.url,
                self._fail_count,
                why,
                self._reconnect_max_s,
            )
        else:
            logger.debug("%s: connecting to %s failed: %s", self.client_id, self.url, why)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        was_connected = self._connected.is_set()
        with self._cond:
            self._connected.clear()
            self._subscribed.clear()
            if reason_code.is_failure or reason_code.value != 0:
                self.last_error = f"disconnected: {reason_code}"
            self._cond.notify_all()
        if was_connected and not self._closing:
            logger.warning(
                "%s: lost connection to %s (%s); reconnecting",
                self.client_id,
                self.url,
                reason_code,
            )

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self.tcp_nodelay and hasattr(sock, "setsockopt"):
            with contextlib.suppress(OSError):  # e.g. a socket type without TCP options
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        with self._cond:  # publish_many waits for its packet ids here
            self._ack_seq += 1
            self._acks[mid] = self._ack_seq
            self._acks.move_to_end(mid)
            while len(self._acks) > _MAX_ACKS:
                self._acks.popitem(last=False)
            self._cond.notify_all()
        if not reason_code.is_failure:
            if self._refusals:  # a success for a reused packet id clears an old refusal
                with self._lock:
                    self._refusals.pop(mid, None)
            return
        self.refused_publishes += 1
        with self._lock:
            self._refusals[mid] = str(reason_code)
            while len(self._refusals) > _MAX_REFUSALS:
                self._refusals.popitem(last=False)
        logger.warning("%s: %s refused publish #%d: %s", self.client_id, self.url, mid, reason_code)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Any,
    ) -> None:
        with self._cond:
            filters = self._pending.pop(mid, None)
            if filters is None:
                self._early_acks.add(mid)
            self._update_subscribed()
        for topic_filter, code in zip(filters or [], reason_codes, strict=False):
            if code.is_failure:
                logger.warning(
                    "%s: broker %s refused the subscription to %s: %s",
                    self.client_id,
                    self.url,
                    topic_filter,
                    code,
                )

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            logger.warning("%s: dropped a message whose topic is not UTF-8", self.client_id)
            return
        with self._lock:
            handlers = [h for f, (h, _) in self._subs.items() if mqtt.topic_matches_sub(f, topic)]
        payload = bytes(message.payload)  # paho types it bytes | bytearray; handlers take bytes
        for handler in handlers:
            try:
                handler(topic, payload)
            except Exception:
                self.handler_errors += 1
                logger.exception("%s: handler %r failed on %s", self.client_id, handler, topic)

    # -- context manager -----------------------------------------------------------------------

    def __enter__(self) -> MqttTransport:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"MqttTransport(url={self.url!r}, client_id={self.client_id!r}, {state})"
