"""`bitfleet fleet keys`: the files it writes run real brokers, agents and `fleet ls` as made.

Each broker test provisions a fleet (`keys init`, `keys add pi-01 pi-02`), starts Mosquitto or
the embedded broker (`bitfleet broker`) on the generated password and ACL files, installs
pi-01's device folder as a device would, and runs the agent from its agent.toml unchanged but
for the test's state folder, HTTP port and heartbeat.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import FLEET
from fleet_cli_support import fails_with_one_line, fleet_cli

from edge_agent.broker import MosquittoBroker, free_port
from edge_agent.broker_access import (
    check_password,
    hash_password,
    read_acl_file,
    read_password_file,
)
from edge_agent.config import load_config
from edge_agent.protocol import MIN_KEY_BYTES, Command
from edge_agent.transport import TransportError
from toolkit.cli._fleet import connect
from toolkit.fleet_keys import ACL_TEXT, OPERATOR, KeyFolder
from toolkit.fleet_settings import resolve

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("no_user_settings")


def _keys(*args: str):
    return fleet_cli("keys", *args)


def _ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def initialised(tmp_path) -> tuple[KeyFolder, dict]:
    """A key folder after `bitfleet fleet keys init --json`, and what it printed."""
    folder = KeyFolder(tmp_path / "keys")
    return folder, json.loads(_ok(_keys("init", "--dir", str(folder.root), "--json")))


@pytest.fixture
def keys(initialised) -> KeyFolder:
    return initialised[0]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------- the files made
def test_init_writes_the_key_accounts_and_acl_with_private_modes(keys, no_user_settings):
    assert len(keys.fleet_key.read_bytes()) == MIN_KEY_BYTES
    password = keys.operator_password.read_text()
    assert password.endswith("\n") and len(password.strip()) >= 32
    accounts = read_password_file(keys.password_file)  # what the embedded broker reads
    assert list(accounts) == [OPERATOR]
    assert check_password(accounts[OPERATOR], password.strip())
    assert keys.acl_file.read_text() == ACL_TEXT
    for secret in (keys.fleet_key, keys.operator_password, keys.password_file):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert stat.S_IMODE(keys.root.stat().st_mode) == 0o700

    # the default folder is `keys` beside fleet.toml, and --json says where everything went
    result = _keys("init", "--json")
    document = json.loads(_ok(result))
    default = no_user_settings.parent / "keys"
    assert document["dir"] == str(default) and Path(document["fleet_key"]).is_file()
    assert document["fleet_toml"] == [
        'key_file = "keys/fleet.key"',
        'device_keys_dir = "keys/devices"',
        'username = "laptop"',
        'password_file = "keys/laptop.password"',
    ]
    assert (default / "laptop.password").read_text().strip() not in result.stdout


def test_the_acl_is_the_shipped_one_and_lets_the_operator_do_everything():
    shipped = ROOT / "ops" / "mosquitto" / "bitfleet.acl"
    assert shipped.read_text() == ACL_TEXT, (
        "ops/mosquitto/bitfleet.acl and toolkit.fleet_keys.ACL_TEXT differ: change both"
    )
    acl = read_acl_file(shipped)
    assert acl.allows(OPERATOR, "x", "bitfleet/lab/dev/pi-01/cmd", write=True)
    assert acl.allows(OPERATOR, "x", "bitfleet/lab/dev/pi-01/state", write=False)


def test_password_hashes_are_mosquitto_passwd_s():
    digest = hash_password("correct horse")
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", digest)
    assert check_password(digest, "correct horse") and not check_password(digest, "wrong")
    assert hash_password("x", salt=b"s" * 12) == hash_password("x", salt=b"s" * 12)
    assert hash_password("x") != hash_password("x")  # a fresh salt each time


def test_add_writes_each_device_s_key_account_and_folder(keys, tmp_path):
    result = _keys(
        "add", "pi-01", "pi-02", "--dir", str(keys.root), "--broker", "mqtt://10.0.0.2:1883"
    )
    out = _ok(result)
    assert "rsync" in out and "agents/pi-01/" in out and "warning" not in result.output
    accounts = read_password_file(keys.password_file)
    assert list(accounts) == [OPERATOR, "pi-01", "pi-02"]
    for device in ("pi-01", "pi-02"):
        key = keys.device_key(device).read_bytes()
        assert (
            len(key) == MIN_KEY_BYTES
            and stat.S_IMODE(keys.device_key(device).stat().st_mode) == 0o600
        )
        folder = keys.agent_folder(device)
        config = load_config(folder / "agent.toml", environ={})
        assert (config.id, config.username, config.fleet) == (device, device, FLEET)
        assert config.broker == "mqtt://10.0.0.2:1883"
        assert (config.key_file, config.device_keys_dir) == (
            "/etc/bitfleet/fleet.key",
            "/etc/bitfleet/keys",
        )
        assert check_password(accounts[device], config.password)
        assert config.password not in out
        assert (folder / "fleet.key").read_bytes() == keys.fleet_key.read_bytes()
        assert sorted(p.name for p in (folder / "keys").iterdir()) == ["pi-01.key", "pi-02.key"]
        for file in folder.rglob("*"):
            assert stat.S_IMODE(file.stat().st_mode) == (0o700 if file.is_dir() else 0o600)
    assert keys.agent_folder("pi-01").joinpath("keys", "pi-02.key").read_bytes() == (
        keys.device_key("pi-02").read_bytes()
    )

    # a later device: the earlier folders get its key, and the output says to copy them again
    result = _keys("add", "pi-03", "--dir", str(keys.root), "--json")
    document = json.loads(_ok(result))
    assert document["peers_to_update"] == ["pi-01", "pi-02"]
    assert [row["id"] for row in document["devices"]] == ["pi-03"]
    assert "warning" in result.stderr and "127.0.0.1" in result.stderr  # the default broker
    assert (keys.agent_folder("pi-01") / "keys" / "pi-03.key").is_file()


# --------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("bad", ["pi/01", "pi+", "#", "pi 01", "..", OPERATOR, "x" * 65])
def test_a_bad_device_id_is_one_line_and_nothing_is_written(keys, bad):
    before = _snapshot(keys.root)
    line = fails_with_one_line(_keys("add", "pi-01", bad, "--dir", str(keys.root)))
    assert repr(bad) in line
    assert _snapshot(keys.root) == before  # not even pi-01


def test_existing_secrets_are_kept_without_force(keys):
    key = keys.fleet_key.read_bytes()
    line = fails_with_one_line(_keys("init", "--dir", str(keys.root)))
    assert str(keys.fleet_key) in line and "--force" in line
    assert keys.fleet_key.read_bytes() == key

    _ok(_keys("add", "pi-01", "--dir", str(keys.root)))
    before = _snapshot(keys.root)
    line = fails_with_one_line(_keys("add", "pi-02", "pi-01", "--dir", str(keys.root)))
    assert "pi-01" in line and "--force" in line
    assert _snapshot(keys.root) == before

    old_device = keys.device_key("pi-01").read_bytes()
    _ok(_keys("add", "pi-01", "--force", "--dir", str(keys.root)))
    assert keys.device_key("pi-01").read_bytes() != old_device

    # --force on init: a new fleet key and laptop password; device accounts stay, and the
    # device folders get the new fleet key
    _ok(_keys("init", "--force", "--dir", str(keys.root)))
    assert keys.fleet_key.read_bytes() != key
    assert list(read_password_file(keys.password_file)) == [OPERATOR, "pi-01"]
    assert keys.agent_folder("pi-01").joinpath("fleet.key").read_bytes() == (
        keys.fleet_key.read_bytes()
    )


def test_add_before_init_and_a_relative_device_dir_are_one_line(tmp_path, keys):
    line = fails_with_one_line(_keys("add", "pi-01", "--dir", str(tmp_path / "empty")))
    assert "keys init" in line and str(tmp_path / "empty") in line
    assert not (tmp_path / "empty").exists()
    line = fails_with_one_line(
        _keys("add", "pi-01", "--dir", str(keys.root), "--device-dir", "etc/bitfleet")
    )
    assert "must be absolute" in line


def test_an_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = fails_with_one_line(_keys("init", "--dir", str(blocker / "keys")))
    assert str(blocker / "keys") in line and "--dir" in line
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        line = fails_with_one_line(_keys("init", "--dir", str(locked)))
        assert str(locked) in line and "permission denied" in line.lower()


# ----------------------------------------------------------------- the files on real brokers
def _embedded(port: int, keys: KeyFolder) -> subprocess.Popen[str]:
    """`bitfleet broker` on the generated files, once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "toolkit.cli", "broker", "--port", str(port)]
        + ["--password-file", str(keys.password_file), "--acl-file", str(keys.acl_file)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert "broker listening on" in line, line + process.stdout.read()
    return process


@pytest.fixture(params=["mosquitto", "amqtt"])
def provisioned(
    request, initialised, tmp_path, no_user_settings
) -> Iterator[tuple[str, KeyFolder, Path]]:
    """(broker URL, key folder, pi-01's installed device folder) on a broker that runs them.

    fleet.toml holds the lines `keys init` printed, so `bitfleet fleet ...` is the laptop.
    """
    keys, printed = initialised
    device_dir = tmp_path / "pi-01" / "etc" / "bitfleet"
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    add = ["add", "pi-01", "pi-02", "--dir", str(keys.root), "--broker", url, "--fleet", FLEET]
    _ok(_keys(*add, "--device-dir", str(device_dir)))
    shutil.copytree(keys.agent_folder("pi-01"), device_dir)  # what rsync does on the device
    config = no_user_settings
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        "\n".join([f'broker = "{url}"', f'fleet = "{FLEET}"', *printed["fleet_toml"]])
    )
    if request.param == "mosquitto":
        with MosquittoBroker(port=port, password_file=keys.password_file, acl_file=keys.acl_file):
            yield url, keys, device_dir
    else:
        process = _embedded(port, keys)
        try:
            yield url, keys, device_dir
        finally:
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=20)


def _agent_config(state: Path, artifact: Path, config: Path):
    """A device's agent.toml as written; only test-local settings come as flags."""
    flags = {"state_dir": str(state), "http_port": 0, "heartbeat_s": 0.5, "artifact": str(artifact)}
    return load_config(config, flags=flags, environ={})


def _ls(*args: str):
    return fleet_cli("ls", "--json", "--wait", "5", prefix=args)


def test_provisioned_devices_join_and_the_laptop_lists_and_commands_them(
    provisioned, agents, artifact, tmp_path
):
    url, keys, device_dir = provisioned
    config = _agent_config(tmp_path / "state-1", artifact, device_dir / "agent.toml")
    assert (config.username, config.key_file) == ("pi-01", str(device_dir / "fleet.key"))
    pi01 = agents(config)
    assert pi01.keyring.devices == ("pi-01", "pi-02")  # it signs with its own key
    # pi-02 runs from its own agent.toml; its key paths name pi-01's folder, which holds the
    # same files (one test machine, one /etc/bitfleet)
    pi02 = agents(
        _agent_config(tmp_path / "state-2", artifact, keys.agent_folder("pi-02") / "agent.toml")
    )

    result = _ls()
    rows = {row["id"]: row for row in json.loads(_ok(result))}
    assert set(rows) == {"pi-01", "pi-02"}, result.output
    for row in rows.values():
        assert row["status"] == "online" and row["dropped"] == 0 and row["model"] == "digits"
    assert "warning" not in result.stderr
    # each device verifies the other with the other's own key: they see each other online
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (
        pi01.presence.online_peers() == ["pi-02"] and pi02.presence.online_peers() == ["pi-01"]
    ):
        time.sleep(0.05)
    assert pi01.presence.online_peers() == ["pi-02"] and pi02.presence.online_peers() == ["pi-01"]

    # without the device keys the laptop cannot read them: they sign with their own keys
    blind = _ls("--device-keys-dir", str(tmp_path / "no-keys"))
    assert blind.exit_code == 1 and "not a folder" in blind.output
    (tmp_path / "no-keys").mkdir()
    blind = _ls("--device-keys-dir", str(tmp_path / "no-keys"))
    assert blind.exit_code == 1 and "key may be wrong" in blind.output

    # the laptop's commands pass the ACL and the device's signature check, and back
    client = connect(resolve())
    try:
        assert client.command("pi-01", Command.PING, timeout=10)["ok"]
    finally:
        client.close()


def _login(transports, url: str, user: str, password: str, client_id: str):
    transport = transports(url, client_id=client_id, username=user, password=password)
    transport.connect(timeout=5)
    return transport


def test_wrong_passwords_and_other_devices_topics_are_refused(provisioned, transports):
    url, keys, _ = provisioned
    passwords = {
        device: load_config(keys.agent_folder(device) / "agent.toml", environ={}).password
        for device in ("pi-01", "pi-02")
    }
    with pytest.raises(TransportError, match="Not authorized|refused"):
        _login(transports, url, "pi-02", passwords["pi-01"], "pi-02")  # pi-01's password
    with pytest.raises(TransportError, match="Not authorized|refused"):
        _login(transports, url, "pi-02", "guess", "pi-02")

    seen: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def record(topic: str, payload: bytes) -> None:
        with lock:
            seen.append((topic, payload))

    laptop = transports(
        url,
        client_id="laptop-watch",
        username=OPERATOR,
        password=keys.operator_password.read_text().strip(),
    )
    laptop.subscribe(f"bitfleet/{FLEET}/dev/#", record)
    laptop.connect(timeout=5)
    assert laptop.wait_subscribed(5)
    pi01 = _login(transports, url, "pi-01", passwords["pi-01"], "pi-01")
    pi01.publish_and_wait(f"bitfleet/{FLEET}/dev/pi-02/state", b"spoofed")
    marker = (f"bitfleet/{FLEET}/dev/pi-01/state", b"own")
    pi01.publish_and_wait(*marker)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and marker not in seen:
        time.sleep(0.02)
    time.sleep(0.3)  # anything the broker let through would have arrived by now
    with lock:
        assert seen == [marker]
