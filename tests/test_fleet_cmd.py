"""`bitfleet fleet ls` on a real Mosquitto, and the fleet connection settings it resolves."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from agent_support import FLEET, agent_config
from fleet_cli_support import broken_help_lines, commands, flags, fleet_cli, one_line

from edge_agent.broker import free_port
from toolkit.cli import fleet_cmd
from toolkit.fleet_settings import (
    DEFAULT_BROKER,
    DEFAULT_FLEET,
    FleetSettingsError,
    resolve,
)

pytestmark = pytest.mark.usefixtures("no_user_settings")


def _ls(*args: str, env: dict[str, str] | None = None):
    return fleet_cli("ls", *args, env=env)


# ------------------------------------------------------------------------------ settings
def test_settings_flags_beat_env_beat_file_beat_defaults(tmp_path):
    config = tmp_path / "fleet.toml"
    assert resolve(env={}, config=config).broker == DEFAULT_BROKER
    assert resolve(env={}, config=config).fleet == DEFAULT_FLEET
    assert resolve(env={}, config=config).key_file is None

    config.write_text('broker = "mqtt://file:1883"\nfleet = "f1"\nkey_file = "keys/k.key"\n')
    from_file = resolve(env={}, config=config)
    assert (from_file.broker, from_file.fleet) == ("mqtt://file:1883", "f1")
    assert from_file.key_file == tmp_path / "keys" / "k.key"  # relative to fleet.toml
    assert from_file.sources["fleet"] == str(config)

    env = {"BITFLEET_BROKER": "mqtt://env:1883", "BITFLEET_FLEET": "", "BITFLEET_KEY_FILE": "e"}
    from_env = resolve(env=env, config=config)
    assert from_env.broker == "mqtt://env:1883" and from_env.sources["broker"] == "BITFLEET_BROKER"
    assert from_env.fleet == "f1"  # an empty variable counts as unset
    assert from_env.key_file == Path("e")

    flags = resolve(broker="mqtt://flag:1", fleet="f2", key_file="k", env=env, config=config)
    assert (flags.broker, flags.fleet, flags.key_file) == ("mqtt://flag:1", "f2", Path("k"))
    assert flags.sources == {"broker": "--broker", "fleet": "--fleet", "key_file": "--key-file"}


def test_a_missing_key_file_names_every_way_to_set_it(tmp_path):
    config = tmp_path / "fleet.toml"
    for settings in (
        resolve(env={}, config=config),
        resolve(env={"BITFLEET_KEY_FILE": str(tmp_path / "nope.key")}, config=config),
    ):
        with pytest.raises(FleetSettingsError) as caught:
            settings.require_key_file()
        message = str(caught.value)
        assert "\n" not in message
        assert "--key-file" in message and "BITFLEET_KEY_FILE" in message
        assert str(config) in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("broker = ", "cannot read"), ("colour = 'red'", "unknown setting"), ("fleet = 3", "string")],
)
def test_a_bad_settings_file_is_named(tmp_path, text, expected):
    config = tmp_path / "fleet.toml"
    config.write_text(text)
    with pytest.raises(FleetSettingsError, match=expected) as caught:
        resolve(env={}, config=config)
    assert str(config) in str(caught.value)


# ------------------------------------------------------------------------------ fleet ls
def test_ls_lists_devices_online_then_one_offline(mosquitto, agents, key_file, artifact, tmp_path):
    first = agents(agent_config(mosquitto.url, key_file, tmp_path / "a", artifact=str(artifact)))
    agents(
        agent_config(mosquitto.url, key_file, tmp_path / "b", id="pi-02", artifact=str(artifact))
    )
    result = _ls("--json", "--wait", "5", *flags(mosquitto.url, key_file))
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["id"] for row in rows] == ["pi-01", "pi-02"]
    for row in rows:
        assert row["status"] == "online"
        assert (row["model"], row["version"]) == ("digits", "1")
        assert row["telemetry"] and 0 <= row["last_seen_s"] < 5
        assert row["rss_mb"] > 0 and row["dropped"] == 0
        assert {"round", "accuracy", "learning"} <= set(row)

    first.shutdown()
    result = _ls("--json", "--wait", "0", *flags(mosquitto.url, key_file))
    assert result.exit_code == 0, result.output
    status = {row["id"]: row["status"] for row in json.loads(result.stdout)}
    assert status == {"pi-01": "offline", "pi-02": "online"}

    table = _ls("--wait", "0", *flags(mosquitto.url, key_file))
    assert table.exit_code == 0, table.output
    assert "pi-01" in table.stdout and "offline" in table.stdout and "digits" in table.stdout


def test_ls_reads_its_settings_from_the_environment(
    mosquitto, agents, key_file, artifact, tmp_path
):
    agents(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifact)))
    env = {"BITFLEET_BROKER": mosquitto.url, "BITFLEET_FLEET": FLEET}
    env["BITFLEET_KEY_FILE"] = str(key_file)
    result = _ls("--json", "--wait", "0", env=env)
    assert result.exit_code == 0, result.output
    assert [row["id"] for row in json.loads(result.stdout)] == ["pi-01"]
    # flags after `fleet` work too, and a flag beats the environment
    env["BITFLEET_FLEET"] = "elsewhere"
    result = fleet_cli("ls", "--json", prefix=("--fleet", FLEET), env=env)
    assert [row["id"] for row in json.loads(result.stdout)] == ["pi-01"]


def test_an_empty_fleet_says_so_and_exits_0(mosquitto, key_file):
    result = _ls("--wait", "0", *flags(mosquitto.url, key_file))
    assert result.exit_code == 0
    line = one_line(result.stdout)
    assert "no device has announced itself" in line and FLEET in line and mosquitto.url in line
    result = _ls("--json", "--wait", "0", *flags(mosquitto.url, key_file))
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_an_unreachable_broker_is_one_line_within_seconds(key_file):
    url = f"mqtt://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = _ls("--json", *flags(url, key_file))
    assert time.monotonic() - started < 10
    assert result.exit_code != 0
    line = one_line(result.output)
    assert line.startswith("error:") and url in line


def test_a_missing_key_file_isone_line(mosquitto, tmp_path):
    result = _ls("--broker", mosquitto.url)
    assert result.exit_code != 0
    line = one_line(result.output)
    assert "--key-file" in line and "BITFLEET_KEY_FILE" in line and "fleet.toml" in line
    result = _ls("--broker", mosquitto.url, "--key-file", str(tmp_path / "gone.key"))
    assert result.exit_code != 0 and "gone.key" in one_line(result.output)


def test_a_wrong_key_is_named(mosquitto, agents, key_file, artifact, tmp_path):
    agents(agent_config(mosquitto.url, key_file, tmp_path / "s", artifact=str(artifact)))
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"w" * 32)
    result = _ls("--json", "--wait", "0", *flags(mosquitto.url, wrong))
    assert result.exit_code != 0
    line = one_line(result.output)
    assert "pi-01" in line and "key may be wrong" in line


def test_watch_redraws_until_ctrl_c(mosquitto, agents, key_file, artifact, tmp_path, monkeypatch):
    agents(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifact)))
    ticks: list[float] = []

    def tick(seconds: float) -> None:
        ticks.append(seconds)
        if len(ticks) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(fleet_cmd, "_tick", tick)
    result = _ls("--watch", "--wait", "0", *flags(mosquitto.url, key_file))
    assert result.exit_code == 0, result.output
    assert "pi-01" in result.stdout and ticks == [1.0, 1.0]
    result = _ls("--watch", "--json", *flags(mosquitto.url, key_file))
    assert result.exit_code != 0 and "--watch" in result.output


# ------------------------------------------------------- broker account and per-device keys
def test_account_and_device_keys_settings_resolve_like_the_others(tmp_path):
    config = tmp_path / "fleet.toml"
    empty = resolve(env={}, config=config)
    assert (empty.username, empty.password_file, empty.device_keys_dir) == (None, None, None)
    assert empty.password() is None  # anonymous access

    config.write_text(
        'username = "laptop"\npassword_file = "keys/laptop.password"\n'
        'device_keys_dir = "keys/devices"\n'
    )
    from_file = resolve(env={}, config=config)
    assert from_file.username == "laptop"
    assert from_file.password_file == tmp_path / "keys" / "laptop.password"  # like key_file
    assert from_file.device_keys_dir == tmp_path / "keys" / "devices"

    env = {
        "BITFLEET_USERNAME": "ops",
        "BITFLEET_PASSWORD_FILE": "/env/pw",
        "BITFLEET_DEVICE_KEYS_DIR": "",  # empty: unset, the file's value stays
    }
    from_env = resolve(env=env, config=config)
    assert (from_env.username, from_env.password_file) == ("ops", Path("/env/pw"))
    assert from_env.sources["username"] == "BITFLEET_USERNAME"
    assert from_env.device_keys_dir == tmp_path / "keys" / "devices"

    flags = resolve(username="me", password_file="p", device_keys_dir="d", env=env, config=config)
    assert (flags.username, flags.password_file, flags.device_keys_dir) == (
        "me",
        Path("p"),
        Path("d"),
    )
    assert flags.sources["password_file"] == "--password-file"


def test_the_password_is_the_first_line_of_its_file_and_errors_name_the_fix(tmp_path):
    config = tmp_path / "fleet.toml"
    secret = tmp_path / "pw"
    secret.write_text("s3cret with spaces\nignored\n")
    settings = resolve(username="laptop", password_file=secret, env={}, config=config)
    assert settings.password() == "s3cret with spaces"

    no_user = resolve(password_file=secret, env={}, config=config)
    with pytest.raises(FleetSettingsError, match="needs a broker user name") as caught:
        no_user.password()
    assert "BITFLEET_USERNAME" in str(caught.value) and "--username" in str(caught.value)

    missing = resolve(username="u", password_file=tmp_path / "gone", env={}, config=config)
    with pytest.raises(FleetSettingsError, match="cannot read password file .*gone"):
        missing.password()
    (tmp_path / "empty").write_text("\n")
    empty = resolve(username="u", password_file=tmp_path / "empty", env={}, config=config)
    with pytest.raises(FleetSettingsError, match="is empty"):
        empty.password()


def test_the_keyring_holds_the_device_keys_the_agents_sign_with(tmp_path):
    config = tmp_path / "fleet.toml"
    fleet_key = tmp_path / "fleet.key"
    fleet_key.write_bytes(b"f" * 32)
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "pi-01.key").write_bytes(b"1" * 32)
    keyring = resolve(key_file=fleet_key, device_keys_dir=devices, env={}, config=config).keyring()
    assert keyring.devices == ("pi-01",)
    assert keyring.key_for("pi-01") == b"1" * 32 and keyring.key_for("laptop") == b"f" * 32
    assert resolve(key_file=fleet_key, env={}, config=config).keyring().devices == ()

    gone = resolve(key_file=fleet_key, device_keys_dir=tmp_path / "nope", env={}, config=config)
    with pytest.raises(FleetSettingsError, match="device keys folder .*nope.* is not a folder"):
        gone.keyring()
    (devices / "pi-02.key").write_bytes(b"short")
    with pytest.raises(ValueError, match="pi-02"):
        resolve(key_file=fleet_key, device_keys_dir=devices, env={}, config=config).keyring()


@pytest.mark.parametrize("path", commands(), ids=lambda path: " ".join(path) or "bitfleet")
def test_every_command_s_help_reads_as_paragraphs(path):
    """No --help of any command shows a sentence broken where its source line ended."""
    assert broken_help_lines(*path) == []
