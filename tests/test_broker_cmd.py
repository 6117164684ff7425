"""`bitfleet broker`: the embedded broker in the foreground, and Mosquitto's password/ACL files.

The command runs as a real subprocess; real paho clients connect to it. The ACL is the one the
project ships for Mosquitto (ops/mosquitto/bitfleet.acl), so both brokers enforce one file.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from edge_agent.broker import free_port, is_loopback, write_password_file
from edge_agent.broker_access import AccessError, check_password, read_acl_file, read_password_file
from toolkit.cli import app

ROOT = Path(__file__).resolve().parents[1]
ACL = ROOT / "ops" / "mosquitto" / "bitfleet.acl"
PASSWORDS = {"pi-01": "pw-pi-01", "pi-02": "pw-pi-02", "laptop": "pw-laptop"}


@pytest.fixture(scope="module")
def password_file(tmp_path_factory) -> Path:
    return write_password_file(tmp_path_factory.mktemp("auth") / "passwd", PASSWORDS)


def _start(*args: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "toolkit.cli", "broker", "--port", str(port), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until the broker says it listens (or dies)
    assert "broker listening on mqtt://127.0.0.1" in line, line + process.stdout.read()
    return process, port


@pytest.fixture
def secured(password_file) -> Iterator[int]:
    process, port = _start("--password-file", str(password_file), "--acl-file", str(ACL))
    yield port
    process.send_signal(signal.SIGINT)
    process.wait(timeout=20)


def _client(port: int, user: str | None, password: str | None) -> tuple[mqtt.Client, int]:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.time_ns()}")
    if user is not None:
        client.username_pw_set(user, password)
    codes: queue.Queue[int] = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p=None: codes.put(rc.value)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        code = codes.get(timeout=10)
    except queue.Empty:
        code = -1
    return client, code


def test_foreground_broker_serves_and_ctrl_c_stops_it_cleanly():
    process, port = _start()
    try:
        received: queue.Queue[bytes] = queue.Queue()
        sub, code = _client(port, None, None)
        assert code == 0
        sub.on_message = lambda c, u, m: received.put(m.payload)
        sub.subscribe("bitfleet/lab/#", qos=1)
        time.sleep(0.3)
        pub, _ = _client(port, None, None)
        pub.publish("bitfleet/lab/x", b"hello", qos=1).wait_for_publish(5)
        assert received.get(timeout=10) == b"hello"
        for client in (sub, pub):
            client.loop_stop()
            client.disconnect()
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=20)
    assert process.returncode == 0, out
    assert "broker stopped" in out and "Traceback" not in out


def test_password_and_acl_files_are_enforced(secured):
    port = secured
    _, wrong = _client(port, "pi-01", "not-the-password")
    assert wrong != 0  # refused: bad user name or password
    _, anonymous = _client(port, None, None)
    assert anonymous != 0
    laptop, code = _client(port, "laptop", PASSWORDS["laptop"])
    assert code == 0
    seen: queue.Queue[str] = queue.Queue()
    laptop.on_message = lambda c, u, m: seen.put(m.topic)
    laptop.subscribe("bitfleet/lab/dev/#", qos=1)
    time.sleep(0.3)
    device, code = _client(port, "pi-01", PASSWORDS["pi-01"])
    assert code == 0
    device.publish("bitfleet/lab/dev/pi-02/state", b"spoofed", qos=1).wait_for_publish(5)
    device.publish("bitfleet/lab/dev/pi-01/state", b"own", qos=1).wait_for_publish(5)
    assert seen.get(timeout=10) == "bitfleet/lab/dev/pi-01/state"  # the spoof never arrived
    time.sleep(0.3)
    assert seen.empty()
    for client in (laptop, device):
        client.loop_stop()
        client.disconnect()


def test_the_shipped_acl_reads_as_mosquitto_does():
    acl = read_acl_file(ACL)
    assert acl.allows("pi-01", "c", "bitfleet/lab/dev/pi-01/state", write=True)
    assert not acl.allows("pi-01", "c", "bitfleet/lab/dev/pi-02/state", write=True)
    assert acl.allows("pi-01", "c", "bitfleet/lab/dev/pi-02/gossip", write=True)
    assert not acl.allows("pi-01", "c", "bitfleet/lab/dev/pi-02/gossip", write=False)
    assert acl.allows("pi-01", "c", "bitfleet/lab/dev/pi-01/cmd", write=False)
    assert not acl.allows("pi-01", "c", "bitfleet/lab/dev/pi-01/cmd", write=True)
    assert acl.allows("laptop", "c", "bitfleet/lab/dev/pi-01/cmd", write=True)
    assert not acl.allows(None, "c", "bitfleet/lab/dev/pi-01/state", write=True)


def test_mosquitto_password_hashes_check(password_file):
    users = read_password_file(password_file)
    assert set(users) == set(PASSWORDS)
    assert check_password(users["pi-01"], "pw-pi-01")
    assert not check_password(users["pi-01"], "pw-pi-02")


def test_bad_files_and_hosts_are_one_line(tmp_path):
    runner = CliRunner()
    refused = runner.invoke(app, ["broker", "--host", "0.0.0.0"])
    assert refused.exit_code == 1
    assert "refusing to listen on 0.0.0.0 without --password-file" in refused.output
    assert "Traceback" not in refused.output
    bad = tmp_path / "passwd"
    bad.write_text("pi-01:plaintext\n")
    with pytest.raises(AccessError, match=r"line 1: not a 'user:\$7\$\.\.\.' entry"):
        read_password_file(bad)
    result = runner.invoke(app, ["broker", "--password-file", str(bad)])
    assert result.exit_code == 1 and "mosquitto_passwd" in result.output
    acl = tmp_path / "acl"
    acl.write_text("user laptop\ntopik readwrite bitfleet/#\n")
    with pytest.raises(AccessError, match="line 2: expected 'user NAME'"):
        read_acl_file(acl)
    alone = runner.invoke(app, ["broker", "--acl-file", str(acl)])
    assert alone.exit_code == 1 and "--acl-file needs --password-file" in alone.output
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
