"""The fleet's secrets, made in one place: keys, broker accounts, the ACL, device folders.

``bitfleet fleet keys init`` and ``bitfleet fleet keys add`` call :func:`init_keys` and
:func:`add_devices`; both write one folder (:func:`default_dir`, or ``--dir``) laid out as
:class:`KeyFolder` says::

    <dir>/fleet.key                the fleet key: MIN_KEY_BYTES random bytes (laptop, devices)
    <dir>/bitfleet.passwd          Mosquitto password file: `laptop` and one account per device
    <dir>/bitfleet.acl             the ACL (ACL_TEXT, the same as ops/mosquitto/bitfleet.acl)
    <dir>/laptop.password          the laptop's broker password (fleet.toml password_file)
    <dir>/devices/<id>.key         each device's own key: the laptop's device_keys_dir
    <dir>/agents/<id>/             the folder to copy to device <id> as /etc/bitfleet:
        agent.toml                 id, username, password, key_file, device_keys_dir, ...
        fleet.key                  a copy of the fleet key
        keys/<peer>.key            every device's key (its own among them)

Secrets are written atomically (:mod:`bitfleet.fsutil`) with mode 0600 from the first byte;
folders are made 0700. The password file holds Mosquitto 2's ``$7$`` hashes (PBKDF2-SHA512,
what ``mosquitto_passwd`` writes), made here so the laptop needs no Mosquitto installed; both
Mosquitto and the embedded broker (:mod:`edge_agent.broker_access`) read it. Broker user
name == device id, which the ACL's ``%u`` patterns rely on.

Why every device folder holds every device's key: a device with its own key signs with it,
and a receiver verifies a sender with that sender's key if it holds it, else with the fleet
key (:class:`edge_agent.protocol.Keyring`). Peers read each other's retained state and gossip
frames, so each needs the others' keys, or it drops their frames as forged and never learns
with them. HMAC keys are symmetric, so this does not stop one device from signing as another:
the broker's per-device accounts and the ACL are what confine a device, and what shuts one
out: delete its line in ``bitfleet.passwd`` and reload the broker, and it cannot connect.
(Deleting only its key would not: peers would then check its frames with the fleet key, which
it holds.) A device added later is verified by earlier ones only once their ``keys`` folder is
copied again (:func:`add_devices` refreshes every device folder; the agent reads keys when it
starts).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from bitfleet.errors import BitfleetError
from bitfleet.fsutil import atomic_write_secret, atomic_write_text
from edge_agent.protocol import MIN_KEY_BYTES, validate_name

__all__ = [
    "ACL_TEXT",
    "DEVICE_DIR",
    "OPERATOR",
    "AddReport",
    "FleetKeysError",
    "InitReport",
    "KeyFolder",
    "add_devices",
    "default_dir",
    "fleet_toml_lines",
    "init_keys",
]

OPERATOR = "laptop"
"""The operator's broker account (the ACL's ``user`` block), also the sender name of
:class:`~toolkit.fleet.FleetClient`: no device may take this id."""

DEVICE_DIR = "/etc/bitfleet"
"""Where a device folder goes on the device (ops/agent.toml, ops/bitfleet-agent.service)."""

_STATE_DIR = "/var/lib/bitfleet"  # the agent's state on the device (the systemd StateDirectory)
_PASSWORD_CHARS = 24  # random bytes of a broker password: 32 URL-safe characters, no ':'
# Mosquitto 2's `mosquitto_passwd`: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt ($7$).
_SECRET_MODE = 0o600
_FOLDER_MODE = 0o700

ACL_TEXT = """\
# Mosquitto ACL for a bitfleet fleet (DESIGN.md section 5: topics under bitfleet/<fleet>/).
#
# Install: copy to /etc/mosquitto/bitfleet.acl, point `acl_file` at it (see
# ops/mosquitto/mosquitto.conf) and reload Mosquitto (systemctl reload mosquitto, or SIGHUP).
#
# How Mosquitto 2 reads this file:
# - Access is denied unless a line below grants it. A denied PUBLISH is dropped silently: the
#   client is not disconnected and, on MQTT 3.1.1, still gets its PUBACK (MQTT 5 clients get
#   reason code 0x87 "Not authorized" in the PUBACK). A denied subscription is accepted but
#   delivers nothing the client may not read; messages are checked one by one on delivery.
# - `user NAME` starts lines that apply to that user only; `topic [read|write|readwrite] T`
#   lines follow it. Lines before the first `user` line apply to anonymous clients (none here:
#   the broker runs with allow_anonymous false).
# - `pattern ...` lines apply to EVERY authenticated user, operators included, wherever they
#   appear in the file. In a pattern, %u is replaced by the client's user name and %c by its
#   client id. We use %u: the user name is what the password file authenticates, whereas a
#   client may pick any client id. A device id (user name) must not contain '/', '+' or '#':
#   wildcards cannot appear in a topic name at all, and a '/' would add levels where %u stands.
# - A `+` in a pattern matches any one level, exactly as in a subscription. Mosquitto warns at
#   start that the patterns without %u "do not contain '%c' or '%u'": they are meant for all
#   users, and a `pattern` line is the only way to write a rule for all users.
#
# Accounts: each device authenticates with user name == its device id (pi-01, jetson-02, ...)
# and its own password (mosquitto_passwd). Operators (the laptop, dashboards) get a `user`
# block below. Give every device its own password: revoking one device is then one line.

# --- every device (user name == device id) ---------------------------------------------------

# Its own retained state (online/offline, also the last will), telemetry and command replies.
pattern write bitfleet/+/dev/%u/state
pattern write bitfleet/+/dev/%u/telemetry
pattern write bitfleet/+/dev/%u/reply

# Its own inbox: commands and inference requests from operators, model pushes from peers.
pattern read bitfleet/+/dev/%u/cmd
pattern read bitfleet/+/dev/%u/infer
pattern read bitfleet/+/dev/%u/gossip

# Peer discovery: everyone's retained state.
pattern read bitfleet/+/dev/+/state

# Gossip: a device may push its model to any peer's gossip inbox (receivers verify the
# signature and drop frames that fail; the broker cannot check who signed what).
pattern write bitfleet/+/dev/+/gossip

# Rollout: artifact manifests and chunks, read-only.
pattern read bitfleet/+/artifacts/#

# Deliberately NOT granted to devices: writing any dev/<id>/cmd or dev/<id>/infer topic (only
# operators command devices or ask them for inferences), writing another device's state,
# telemetry or reply, reading other devices' cmd, gossip or telemetry, writing artifacts.

# --- operators ---------------------------------------------------------------------------------

# The laptop running `bitfleet fleet ...`: full access to every fleet. Add a block like this
# one per operator account (a dashboard that only watches would get `topic read bitfleet/#`).
user laptop
topic readwrite bitfleet/#
"""
"""The Mosquitto ACL every bitfleet broker runs: ops/mosquitto/bitfleet.acl, byte for byte.

The package ships no ops/ folder, so the text lives here; a test keeps the two equal.
"""


class FleetKeysError(BitfleetError, ValueError):
    """A key folder that cannot be made or changed as asked (one line, names the fix)."""


def default_dir() -> Path:
    """``keys`` beside the laptop's ``fleet.toml`` (``~/.config/bitfleet/keys`` on Linux)."""
    from toolkit.fleet_settings import config_path

    return config_path().parent / "keys"


@dataclass(frozen=True)
class KeyFolder:
    """Where each file of a key folder is (see the module docstring for the layout)."""

    root: Path

    @property
    def fleet_key(self) -> Path:
        return self.root / "fleet.key"

    @property
    def password_file(self) -> Path:
        return self.root / "bitfleet.passwd"

    @property
    def acl_file(self) -> Path:
        return self.root / "bitfleet.acl"

    @property
    def operator_password(self) -> Path:
        return self.root / f"{OPERATOR}.password"

    @property
    def device_keys(self) -> Path:
        """The laptop's ``device_keys_dir``: one ``<id>.key`` per device."""
        return self.root / "devices"

    @property
    def agents(self) -> Path:
        return self.root / "agents"

    def device_key(self, device: str) -> Path:
        return self.device_keys / f"{device}.key"

    def agent_folder(self, device: str) -> Path:
        """The folder to copy to ``device``."""
        return self.agents / device


@dataclass
class InitReport:
    """What :func:`init_keys` wrote."""

    folder: KeyFolder
    written: list[Path]
    kept_accounts: list[str] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)  # device folders given the new fleet key


@dataclass
class AddReport:
    """What :func:`add_devices` wrote; ``peers`` are earlier devices given the new keys."""

    folder: KeyFolder
    devices: list[str]
    written: list[Path]
    peers: list[str]
    broker: str
    fleet: str
    device_dir: str


# ---------------------------------------------------------------------------- file writing


def _folder(path: Path) -> None:
    """Make ``path`` (and its parents); a folder made here is 0700."""
    if not path.is_dir():
        path.mkdir(parents=True, mode=_FOLDER_MODE)
        os.chmod(path, _FOLDER_MODE)  # whatever the umask


def _writable(root: Path, what: Iterable[Path]) -> None:
    """Make the folders, or fail before writing anything with one line naming the path."""
    for path in (root, *what):
        try:
            _folder(path)
        except OSError as err:
            raise FleetKeysError(
                f"cannot make the key folder {path}: {err.strerror or err}; "
                "choose a folder you can write with --dir"
            ) from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise FleetKeysError(
                f"cannot write in the key folder {path}: permission denied; "
                "choose a folder you can write with --dir"
            )


def _accounts(path: Path) -> dict[str, str]:
    """User name -> its whole line, in file order, of a Mosquitto password file (if any)."""
    if not path.exists():
        return {}
    lines: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        user, sep, _ = line.partition(":")
        if sep and user and not line.lstrip().startswith("#"):
            lines[user] = line
    return lines


def _write_accounts(path: Path, passwords: dict[str, str]) -> None:
    """Set the accounts in ``passwords`` (name -> clear password), keep every other one."""
    from edge_agent.broker_access import hash_password  # with amqtt (the train extra)

    lines = _accounts(path)
    for user, password in passwords.items():
        lines[user] = f"{user}:{hash_password(password)}"
    atomic_write_secret(path, "".join(f"{line}\n" for line in lines.values()).encode("utf-8"))


def _password() -> str:
    return secrets.token_urlsafe(_PASSWORD_CHARS)


def _toml(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; DEL must be escaped too)."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


# --------------------------------------------------------------------------------- init


def init_keys(root: str | os.PathLike[str], *, force: bool = False) -> InitReport:
    """Make a key folder: fleet key, the ``laptop`` account, password file, ACL.

    An existing fleet key or laptop password is replaced only with ``force``; then device
    accounts already in the password file are kept, and every device folder gets the new
    fleet key (the devices need it copied again).
    """
    folder = KeyFolder(Path(root).expanduser())
    if not force:
        for path in (folder.fleet_key, folder.operator_password):
            if path.exists():
                raise FleetKeysError(
                    f"{path} already exists: pass --force to replace the fleet key and the "
                    f"{OPERATOR} password (the broker and every device then need the new files)"
                )
    _writable(folder.root, [])
    key = secrets.token_bytes(MIN_KEY_BYTES)
    password = _password()
    try:
        kept = [user for user in _accounts(folder.password_file) if user != OPERATOR]
        atomic_write_secret(folder.fleet_key, key)
        atomic_write_secret(folder.operator_password, f"{password}\n".encode())
        _write_accounts(folder.password_file, {OPERATOR: password})
        atomic_write_text(folder.acl_file, ACL_TEXT)
        refreshed = []
        for device in _agent_folders(folder):
            atomic_write_secret(folder.agent_folder(device) / "fleet.key", key)
            refreshed.append(device)
    except OSError as err:
        raise _unwritable(err) from None
    written = [folder.fleet_key, folder.operator_password, folder.password_file, folder.acl_file]
    return InitReport(folder, written, kept, refreshed)


def _unwritable(err: OSError) -> FleetKeysError:
    where = err.filename or "the key folder"
    return FleetKeysError(
        f"cannot write {where}: {err.strerror or err}; choose a folder you can write with --dir"
    )


def _agent_folders(folder: KeyFolder) -> list[str]:
    """The devices that have a device folder, sorted."""
    if not folder.agents.is_dir():
        return []
    return sorted(p.name for p in folder.agents.iterdir() if (p / "agent.toml").is_file())


# ---------------------------------------------------------------------------------- add


def _check_devices(devices: Sequence[str]) -> list[str]:
    if not devices:
        raise FleetKeysError("name at least one device id, e.g. bitfleet fleet keys add pi-01")
    seen: list[str] = []
    for device in devices:
        validate_name(device, "device id")
        if device == OPERATOR:
            raise FleetKeysError(
                f"device id {device!r} is the operator's broker account; choose another id"
            )
        if device in seen:
            raise FleetKeysError(f"device id {device!r} is named twice")
        seen.append(device)
    return seen


def add_devices(
    root: str | os.PathLike[str],
    devices: Sequence[str],
    *,
    broker: str,
    fleet: str,
    device_dir: str = DEVICE_DIR,
    force: bool = False,
) -> AddReport:
    """Give each device its own key, broker account and device folder.

    Every id is checked (the protocol's names, not the operator's) and, without ``force``,
    refused if it already has a key or an account, before anything is written. Each device
    folder's ``agent.toml`` points at ``device_dir`` (absolute: where the folder goes on the
    device) and names ``broker`` and ``fleet``. Afterwards every device folder's ``keys``
    holds every device's key.
    """
    from edge_agent.transport import parse_broker_url

    folder = KeyFolder(Path(root).expanduser())
    names = _check_devices(devices)
    validate_name(fleet, "fleet name")
    parse_broker_url(broker)
    if not PurePosixPath(device_dir).is_absolute():
        raise FleetKeysError(
            f"--device-dir {device_dir!r} must be absolute: the agent never relies on its "
            "working directory"
        )
    for needed in (folder.fleet_key, folder.password_file):
        if not needed.is_file():
            raise FleetKeysError(
                f"no fleet keys in {folder.root} ({needed.name} is missing): run "
                f"`bitfleet fleet keys init --dir {folder.root}` first"
            )
    if not force:
        accounts = _accounts(folder.password_file)
        for device in names:
            if folder.device_key(device).exists() or device in accounts:
                raise FleetKeysError(
                    f"device {device} already has a key or a broker account in {folder.root}: "
                    "pass --force to give it a new key and password"
                )
    _writable(folder.root, [folder.device_keys, folder.agents])
    fleet_key = folder.fleet_key.read_bytes()
    passwords = {device: _password() for device in names}
    written: list[Path] = []
    try:
        for device in names:
            atomic_write_secret(folder.device_key(device), secrets.token_bytes(MIN_KEY_BYTES))
            written.append(folder.device_key(device))
        for device in names:
            agent = folder.agent_folder(device)
            _folder(agent)
            atomic_write_secret(agent / "fleet.key", fleet_key)
            config = _agent_toml(device, passwords[device], broker, fleet, device_dir)
            atomic_write_secret(agent / "agent.toml", config.encode("utf-8"))
            written.append(agent)
        peers = [d for d in _agent_folders(folder) if d not in names]
        _sync_keys(folder)
        _write_accounts(folder.password_file, passwords)  # the broker learns the accounts last
        written.append(folder.password_file)
    except OSError as err:
        raise _unwritable(err) from None
    return AddReport(folder, names, written, peers, broker, fleet, device_dir)


def _sync_keys(folder: KeyFolder) -> None:
    """Make every device folder's ``keys`` hold exactly the ``<id>.key`` files of ``devices``."""
    keys = {p.name: p.read_bytes() for p in sorted(folder.device_keys.glob("*.key"))}
    for device in _agent_folders(folder):
        target = folder.agent_folder(device) / "keys"
        _folder(target)
        for stale in target.glob("*.key"):
            if stale.name not in keys:
                stale.unlink()
        for name, key in keys.items():
            path = target / name
            if not path.is_file() or path.read_bytes() != key:
                atomic_write_secret(path, key)


def _agent_toml(device: str, password: str, broker: str, fleet: str, device_dir: str) -> str:
    """The device folder's ``agent.toml``: the keys of ops/agent.toml the agent needs to run."""
    root = PurePosixPath(device_dir)
    settings = {
        "broker": broker,
        "fleet": fleet,
        "id": device,
        "username": device,
        "password": password,
        "key_file": str(root / "fleet.key"),
        "device_keys_dir": str(root / "keys"),
        "state_dir": _STATE_DIR,
    }
    lines = [
        f"# bitfleet-agent settings of device {device}, written by `bitfleet fleet keys add`.",
        f"# This folder goes to {device_dir} on the device; it holds secrets (0640 root:bitfleet).",
        f"# Run: bitfleet-agent run --config {root / 'agent.toml'}",
        "# Every other setting of ops/agent.toml may be added below.",
        *(f"{key} = {_toml(value)}" for key, value in settings.items()),
    ]
    return "\n".join(lines) + "\n"


def fleet_toml_lines(folder: KeyFolder, config: Path) -> list[str]:
    """The ``fleet.toml`` lines that let every ``bitfleet fleet`` command use ``folder``.

    Paths are written relative to ``config``'s folder when ``folder`` lies inside it (as the
    default does), else absolute.
    """
    base = config.parent.absolute()

    def shown(path: Path) -> str:
        full = path.absolute()
        return str(full.relative_to(base)) if full.is_relative_to(base) else str(full)

    return [
        f"key_file = {_toml(shown(folder.fleet_key))}",
        f"device_keys_dir = {_toml(shown(folder.device_keys))}",
        f"username = {_toml(OPERATOR)}",
        f"password_file = {_toml(shown(folder.operator_password))}",
    ]
