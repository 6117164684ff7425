"""MqttTransport against real brokers (Mosquitto and the embedded amqtt), no mocks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.broker import (
    BrokerError,
    MosquittoBroker,
    free_port,
    write_password_file,
)
from edge_agent.transport import MqttTransport, TransportError, parse_broker_url

ROOT = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


class Inbox:
    """A handler that records (topic, payload) pairs."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.items.append((topic, payload))

    def payloads(self, topic: str | None = None) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.items if topic is None or t == topic]

    def wait(self, count: int, timeout: float = 3.0) -> bool:
        return wait_for(lambda: len(self.items) >= count, timeout)


def connected_pair(transports, url: str, topic_filter: str, **kwargs):
    inbox = Inbox()
    sub = transports(url, **kwargs)
    sub.subscribe(topic_filter, inbox)
    sub.connect(timeout=3)
    assert sub.wait_subscribed(3)
    pub = transports(url, **kwargs)
    pub.connect(timeout=3)
    return sub, pub, inbox


# -- round trips -------------------------------------------------------------------------------


def test_round_trip(broker, transports):
    sub, pub, inbox = connected_pair(transports, broker.url, "bitfleet/rt/#")
    assert sub.connected and sub.connect_count == 1
    frames = [bytes(range(256)), b"", b"\x00" * 1000]
    for qos, frame in enumerate(frames):
        pub.publish_and_wait(f"bitfleet/rt/dev/pi-01/q{qos}", frame, qos=qos)
    pub.publish("bitfleet/rt/fire-and-forget", b"ff")
    pub.publish("elsewhere/not-matched", b"no")
    assert inbox.wait(4)
    time.sleep(0.05)
    assert inbox.items == [
        ("bitfleet/rt/dev/pi-01/q0", frames[0]),
        ("bitfleet/rt/dev/pi-01/q1", frames[1]),
        ("bitfleet/rt/dev/pi-01/q2", frames[2]),
        ("bitfleet/rt/fire-and-forget", b"ff"),
    ]
    assert sub.handler_errors == 0 and pub.dropped_publishes == 0


def test_mqtt5_round_trip_on_mosquitto(mosquitto, transports):
    sub, pub, inbox = connected_pair(transports, mosquitto.url, "bitfleet/v5/+/x", protocol="5")
    pub.publish_and_wait("bitfleet/v5/a/x", b"five")
    pub.publish_and_wait("bitfleet/v5/a/y", b"not matched")
    pub.publish_and_wait("bitfleet/v5/b/x", b"six")
    assert inbox.wait(2)
    assert inbox.items == [("bitfleet/v5/a/x", b"five"), ("bitfleet/v5/b/x", b"six")]
    assert pub.broker_max_packet is None  # Mosquitto announces a limit only when configured


def test_amqtt_refuses_mqtt5_with_a_clear_error(amqtt_broker, transports):
    t = transports(amqtt_broker.url, protocol="5")
    with pytest.raises(TransportError, match="refused the connection: Unsupported protocol"):
        t.connect(timeout=3)
    assert not t.connected


def test_dispatch_to_every_matching_filter_and_unsubscribe(mosquitto, transports):
    a, b = Inbox(), Inbox()
    sub = transports(mosquitto.url)
    sub.subscribe("bitfleet/d/+/state", a)
    sub.subscribe("bitfleet/d/pi-01/#", b)
    sub.connect(3)
    assert sub.wait_subscribed(3)
    assert sub.subscriptions == {"bitfleet/d/+/state": 1, "bitfleet/d/pi-01/#": 1}
    pub = transports(mosquitto.url)
    pub.connect(3)
    pub.publish_and_wait("bitfleet/d/pi-01/state", b"1")  # matches both filters
    pub.publish_and_wait("bitfleet/d/pi-02/state", b"2")  # only a
    assert a.wait(2) and b.wait(1)
    sub.unsubscribe("bitfleet/d/+/state")
    sub.unsubscribe("never/subscribed")  # ignored
    pub.publish_and_wait("bitfleet/d/pi-01/state", b"3")
    assert b.wait(2)
    time.sleep(0.05)
    # Mosquitto sends an MQTT 3.1.1 client one copy for overlapping filters: each handler once
    assert a.payloads() == [b"1", b"2"] and b.payloads() == [b"1", b"3"]


# -- retained state and last will --------------------------------------------------------------


def test_retained_state_and_last_will(broker, transports):
    state = "bitfleet/w/dev/pi-01/state"
    device = transports(broker.url, client_id="pi-01", will=(state, b"offline", 1, True))
    device.add_connect_hook(lambda: device.publish(state, b"online", retain=True))
    device.connect(3)
    watcher = Inbox()
    observer = transports(broker.url)
    observer.subscribe("bitfleet/w/dev/+/state", watcher)
    observer.connect(3)
    assert observer.wait_subscribed(3)
    assert wait_for(lambda: b"online" in watcher.payloads())  # retained, published before us

    device.close(clean=False)  # as a crash: no DISCONNECT packet
    assert wait_for(lambda: watcher.payloads()[-1:] == [b"offline"])

    late = Inbox()
    newcomer = transports(broker.url)
    newcomer.subscribe(state, late)
    newcomer.connect(3)
    assert late.wait(1)
    time.sleep(0.05)
    # the will was retained and replaced "online" (amqtt may deliver a retained message twice)
    assert set(late.payloads()) == {b"offline"}


def test_clean_close_sends_no_will(broker, transports):
    watcher = Inbox()
    observer = transports(broker.url)
    observer.subscribe("bitfleet/c/#", watcher)
    observer.connect(3)
    assert observer.wait_subscribed(3)
    device = transports(broker.url, will=("bitfleet/c/state", b"offline", 1, False))
    device.connect(3)
    device.publish_and_wait("bitfleet/c/state", b"going")
    device.close()  # clean: MQTT says the broker discards the will
    observer.publish_and_wait("bitfleet/c/marker", b"end")  # arrives after anything before it
    assert watcher.wait(2)
    assert watcher.payloads() == [b"going", b"end"]


def test_will_after_kill_9(broker, transports):
    state = "bitfleet/k/dev/crashy/state"
    watcher = Inbox()
    observer = transports(broker.url)
    observer.subscribe(state, watcher)
    observer.connect(3)
    assert observer.wait_subscribed(3)
    code = (
        "import time\n"
        "from edge_agent.transport import MqttTransport\n"
        f"t = MqttTransport(url={broker.url!r}, client_id='crashy',"
        f" will=({state!r}, b'offline', 1, True))\n"
        f"t.add_connect_hook(lambda: t.publish({state!r}, b'online', retain=True))\n"
        "t.connect(5)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert wait_for(lambda: watcher.payloads() == [b"online"])
        proc.kill()  # SIGKILL: the kernel closes the socket, no DISCONNECT is sent
        proc.wait(5)
        assert wait_for(lambda: watcher.payloads() == [b"online", b"offline"])
    finally:
        proc.kill()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


# -- reconnects --------------------------------------------------------------------------------


def test_resubscribes_and_runs_hooks_after_broker_restart(broker, transports):
    hooks: list[int] = []
    inbox = Inbox()
    device = transports(broker.url, client_id="pi-07")
    device.subscribe("bitfleet/r/dev/pi-07/cmd", inbox)
    device.add_connect_hook(lambda: hooks.append(device.connect_count))
    device.add_connect_hook(
        lambda: device.publish("bitfleet/r/dev/pi-07/state", b"online", retain=True)
    )
    device.connect(3)
    assert device.wait_subscribed(3) and hooks == [1]
    laptop = transports(broker.url)
    laptop.connect(3)
    laptop.publish_and_wait("bitfleet/r/dev/pi-07/cmd", b"before")
    assert inbox.wait(1)

    broker.restart()  # same port; subscriptions and retained messages are gone
    assert wait_for(lambda: device.connect_count == 2, 5)
    assert device.wait_subscribed(3)
    assert hooks == [1, 2]
    laptop.publish_and_wait("bitfleet/r/dev/pi-07/cmd", b"after", timeout=5)
    assert inbox.wait(2)
    assert inbox.payloads() == [b"before", b"after"]
    # the hook re-published the retained state the restarted broker had forgotten
    states = Inbox()
    watcher = transports(broker.url)
    watcher.subscribe("bitfleet/r/dev/+/state", states)
    watcher.connect(3)
    assert states.wait(1) and states.payloads()[0] == b"online"
    assert device.hook_errors == 0


def test_offline_publishes_are_queued_or_dropped(mosquitto, transports):
    device = transports(mosquitto.url)
    device.connect(3)
    mosquitto.stop()
    assert wait_for(lambda: not device.connected)
    device.publish("bitfleet/o/state", b"queued while offline", qos=1, retain=True)
    device.publish("bitfleet/o/telemetry", b"lost", qos=0)
    assert device.dropped_publishes == 1
    with pytest.raises(TransportError, match="not connected"):
        device.publish_and_wait("bitfleet/o/x", b"x", timeout=0.1)
    mosquitto.start()
    assert wait_for(lambda: device.connect_count == 2, 5)
    inbox = Inbox()
    watcher = transports(mosquitto.url)
    watcher.subscribe("bitfleet/o/#", inbox)
    watcher.connect(3)
    assert inbox.wait(1)
    assert inbox.items == [("bitfleet/o/state", b"queued while offline")]


def test_publish_many_keeps_a_burst_within_the_queue(mosquitto, transports):
    """A burst far beyond ``max_queued`` arrives whole: publish() would drop the excess."""
    sub, pub, inbox = connected_pair(transports, mosquitto.url, "bitfleet/burst/#", max_queued=8)
    messages = [(f"bitfleet/burst/{i}", bytes([i]) * 1000) for i in range(60)]
    assert pub.publish_many(messages, qos=1) == 60
    assert inbox.wait(60, timeout=10)
    assert sorted(inbox.items) == sorted(messages)
    assert pub.dropped_publishes == 0
    with pytest.raises(ValueError, match="QoS 1 or 2"):
        pub.publish_many(messages, qos=0)
    with pytest.raises(ValueError, match="window"):
        pub.publish_many(messages, window=9)


def test_publish_many_gives_up_when_cancelled_or_timed_out(mosquitto, transports):
    device = transports(mosquitto.url, max_queued=4)
    device.connect(3)
    mosquitto.stop()
    assert wait_for(lambda: not device.connected)
    cancel = threading.Event()
    cancel.set()
    messages = [(f"bitfleet/c/{i}", b"x") for i in range(10)]
    with pytest.raises(TransportError, match="cancelled"):
        device.publish_many(messages, cancel=cancel)
    started = time.monotonic()
    with pytest.raises(TransportError, match="did not acknowledge|queue"):
        device.publish_many(messages, timeout=0.3)
    assert time.monotonic() - started < 3


def test_publish_many_resumes_after_a_reconnect(mosquitto, transports):
    """Messages handed over while offline count once the broker acknowledges them later."""
    device = transports(mosquitto.url, max_queued=4)
    device.connect(3)
    mosquitto.stop()
    assert wait_for(lambda: not device.connected)
    result: list[object] = []
    burst = [(f"bitfleet/r/{i}", b"x") for i in range(10)]
    worker = threading.Thread(target=lambda: result.append(device.publish_many(burst, timeout=20)))
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive() and not result  # waiting for acks that cannot come yet
    mosquitto.start()
    worker.join(20)
    assert result == [10]
    assert device.dropped_publishes == 0


def test_sockets_disable_nagle(mosquitto, transports):
    """Small publishes go out at once (TCP_NODELAY) instead of waiting ~40 ms for an ACK."""
    import socket

    fast = transports(mosquitto.url)
    fast.connect(3)
    sock = fast._client.socket()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    plain = transports(mosquitto.url, tcp_nodelay=False)
    plain.connect(3)
    assert plain._client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    assert "set_tcp_nodelay true" in mosquitto.config_text()


# -- failures stay contained -------------------------------------------------------------------


def test_raising_handler_does_not_stop_delivery(broker, transports):
    good = Inbox()
    calls: list[bytes] = []

    def bad(topic: str, payload: bytes) -> None:
        calls.append(payload)
        raise RuntimeError("handler bug")

    sub = transports(broker.url)
    sub.subscribe("bitfleet/h/bad", bad)
    sub.subscribe("bitfleet/h/good", good)
    sub.connect(3)
    assert sub.wait_subscribed(3)
    pub = transports(broker.url)
    pub.connect(3)
    for i in range(3):
        pub.publish_and_wait("bitfleet/h/bad", b"%d" % i)
        pub.publish_and_wait("bitfleet/h/good", b"%d" % i)
    assert good.wait(3)
    assert good.payloads() == [b"0", b"1", b"2"]
    assert calls == [b"0", b"1", b"2"] and sub.handler_errors == 3
    assert sub.connected and sub.connect_count == 1


def test_failing_hook_is_counted_and_publish_and_wait_refused_in_hooks(mosquitto, transports):
    t = transports(mosquitto.url)
    t.add_connect_hook(lambda: t.publish_and_wait("bitfleet/x", b"deadlock?"))
    ran: list[bool] = []
    t.add_connect_hook(lambda: ran.append(True))
    t.connect(3)
    assert wait_for(lambda: ran == [True])
    assert t.hook_errors == 1  # RuntimeError: publish_and_wait from the network thread


# -- configuration and connection errors -------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1", ("127.0.0.1", 1883, False)),
        ("mqtts://broker.lan", ("broker.lan", 8883, True)),
        ("mqtt://broker.lan:1884/", ("broker.lan", 1884, False)),
        ("MQTTS://[::1]:8884", ("::1", 8884, True)),
    ],
)
def test_parse_broker_url(url, expected):
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "tcp://127.0.0.1:1883",
        "127.0.0.1:1883",
        "mqtt://",
        "mqtt://host:99999",
        "mqtt://host:port",
        "mqtt://user:secret@host",
        "mqtt://host/topic",
        "",
    ],
)
def test_bad_url(url):
    with pytest.raises(ValueError, match=r"expected mqtt://host\[:port\] or mqtts://"):
        MqttTransport(url=url, client_id="x")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"protocol": "3.1"}, "unknown MQTT protocol"),
        ({"password": "p"}, "needs a username"),
        ({"ca_file": "/etc/ssl/ca.pem"}, "not an mqtts:// URL"),
        ({"client_id": ""}, "client_id"),
        ({"keepalive": 0}, "keepalive"),
        ({"reconnect_min_s": 5, "reconnect_max_s": 1}, "reconnect_min_s"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MqttTransport(**{"url": "mqtt://127.0.0.1", "client_id": "x", **kwargs})


def test_bad_filter_qos_and_payload(transports):
    t = transports("mqtt://127.0.0.1:1", max_packet_bytes=100)
    for bad in ["a/#/b", "a/b+", "", "a#"]:
        with pytest.raises(ValueError, match="bad topic filter"):
            t.subscribe(bad, lambda topic, payload: None)
    with pytest.raises(ValueError, match="qos"):
        t.subscribe("a/b", lambda topic, payload: None, qos=3)
    with pytest.raises(ValueError, match="exceeds max_packet_bytes"):
        t.publish("a/b", b"x" * 101)
    with pytest.raises(TypeError, match="bytes"):
        t.publish("a/b", "text")  # type: ignore[arg-type]


def test_connect_timeout_against_a_closed_port(transports):
    t = transports(f"mqtt://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(TransportError, match=r"cannot connect to broker mqtt://127\.0\.0\.1:\d+ "):
        t.connect(timeout=0.3)
    assert time.monotonic() - start < 2
    assert "refused" in (t.last_error or "").lower()
    assert not t.connected
    assert not any(th.name == f"paho-mqtt-client-{t.client_id}" for th in threading.enumerate())


def test_waiting_for_an_absent_broker_warns_once_not_per_retry(transports, caplog):
    """A daemon started before its broker says why it is not online, without a flood."""
    t = transports(f"mqtt://127.0.0.1:{free_port()}", reconnect_min_s=0.02, reconnect_max_s=0.05)
    with caplog.at_level("DEBUG", logger="edge_agent.transport"):
        t.connect(timeout=None)  # keep trying in the background, as the daemon does
        assert wait_for(lambda: "Refused" in (t.last_error or ""), 3)
        time.sleep(0.5)  # several more attempts
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    retries = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 1 and "cannot reach broker" in warnings[0].getMessage()
    assert "retrying" in warnings[0].getMessage() and len(retries) >= 2


def test_username_and_password(tmp_path, transports):
    passwd = write_password_file(tmp_path / "passwd", {"pi-01": "right", "laptop": "other"})
    assert (passwd.stat().st_mode & 0o777) == 0o600
    assert "right" not in passwd.read_text()  # hashes only
    with MosquittoBroker(password_file=passwd) as broker:
        ok = transports(broker.url, client_id="pi-01", username="pi-01", password="right")
        ok.connect(timeout=3)
        assert ok.connected
        for kwargs in ({"username": "pi-01", "password": "wrong"}, {}):
            bad = transports(broker.url, client_id="intruder", **kwargs)
            with pytest.raises(TransportError, match="refused the connection: Not authorized"):
                bad.connect(timeout=3)
            assert not bad.connected


def test_broker_packet_limit_is_enforced_before_sending_on_mqtt5(transports):
    with MosquittoBroker(max_packet_size=2048) as broker:
        t = transports(broker.url, protocol="5")
        t.connect(3)
        assert t.broker_max_packet == 2048
        t.publish_and_wait("a/b", b"x" * 1900)
        with pytest.raises(ValueError, match="broker's maximum packet size"):
            t.publish("a/b", b"x" * 2040)
        assert t.connect_count == 1


# -- the broker helpers ------------------------------------------------------------------------


def test_mosquitto_start_failure_shows_its_log():
    broker = MosquittoBroker(extra_config="no_such_option 1")
    with pytest.raises(BrokerError, match="(?s)exited with status.*no_such_option"):
        broker.start()
    broker.close()


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path):
    """A throwaway CA and a broker certificate for the name broker.test (not for 127.0.0.1)."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=bitfleet test CA")  # fmt: skip
    openssl("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=broker.test")
    (tmp_path / "ext").write_text("subjectAltName=DNS:broker.test\n")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "srv.crt", "-days", "2", "-extfile", "ext")  # fmt: skip
    return tmp_path


def test_tls(tls_files, transports):
    port = free_port()
    listener = (
        f"listener {port} 127.0.0.1\n"
        f"cafile {tls_files / 'ca.crt'}\ncertfile {tls_files / 'srv.crt'}\n"
        f"keyfile {tls_files / 'srv.key'}\n"
    )
    with MosquittoBroker(extra_config=listener):
        url = f"mqtts://127.0.0.1:{port}"
        ca = str(tls_files / "ca.crt")
        # the chain is verified with our CA, the name check skipped (the cert names broker.test)
        ok = transports(url, ca_file=ca, insecure_tls=True)
        ok.connect(timeout=3)
        ok.publish_and_wait("bitfleet/tls", b"encrypted")
        for kwargs, why in [
            ({"ca_file": ca}, "not valid for '127.0.0.1'"),
            ({}, "CERTIFICATE_VERIFY_FAILED"),  # system CAs do not know our CA
        ]:
            bad = transports(url, **kwargs)
            with pytest.raises(TransportError, match=why):
                bad.connect(timeout=0.5)
