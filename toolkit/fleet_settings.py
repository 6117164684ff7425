"""Where the laptop finds its fleet: broker URL, fleet name, keys and broker account.

Every ``bitfleet fleet`` command resolves each setting the same way, first match wins:

1. its flag (``--broker``, ``--fleet``, ``--key-file``; ``--device-keys-dir``, ``--username``
   and ``--password-file`` after ``fleet``: ``bitfleet fleet --username laptop ... ls``);
2. the environment (``BITFLEET_BROKER``, ``BITFLEET_FLEET``, ``BITFLEET_KEY_FILE``,
   ``BITFLEET_DEVICE_KEYS_DIR``, ``BITFLEET_USERNAME``, ``BITFLEET_PASSWORD_FILE``);
3. ``fleet.toml`` in the user's config folder (``platformdirs.user_config_dir("bitfleet")``,
   e.g. ``~/.config/bitfleet/fleet.toml`` on Linux)::

       broker = "mqtt://10.0.0.2:1883"
       fleet = "lab"
       key_file = "keys/fleet.key"          # paths: relative to the folder of fleet.toml; ~ works
       device_keys_dir = "keys/devices"     # <device>.key of devices that sign with their own key
       username = "laptop"                  # the broker account (Mosquitto password file)
       password_file = "keys/laptop.password"

   (``bitfleet fleet keys init`` writes exactly these files and prints these lines.)
4. the defaults: ``mqtt://127.0.0.1:1883`` and fleet ``lab``; the others have none (no
   per-device keys, anonymous access to the broker).

The password comes from a file, never a flag or a variable, so it stays out of the process
list and the shell history. The per-device keys are read as the agent reads them
(:meth:`edge_agent.protocol.Keyring.from_files`), so the laptop verifies a device that signs
with its own key exactly as that device's peers do.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bitfleet.errors import BitfleetError, require

if TYPE_CHECKING:
    from edge_agent.protocol import Keyring

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEFAULT_BROKER",
    "DEFAULT_FLEET",
    "ENV",
    "FleetSettings",
    "FleetSettingsError",
    "config_path",
    "resolve",
]

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_FLEET = "lab"
#: the environment variable of each setting
ENV: Mapping[str, str] = {
    "broker": "BITFLEET_BROKER",
    "fleet": "BITFLEET_FLEET",
    "key_file": "BITFLEET_KEY_FILE",
    "device_keys_dir": "BITFLEET_DEVICE_KEYS_DIR",
    "username": "BITFLEET_USERNAME",
    "password_file": "BITFLEET_PASSWORD_FILE",
}
_FLAGS: Mapping[str, str] = {
    "broker": "--broker",
    "fleet": "--fleet",
    "key_file": "--key-file",
    "device_keys_dir": "--device-keys-dir",
    "username": "--username",
    "password_file": "--password-file",
}
#: settings that name a file or folder (relative to fleet.toml's folder when set there)
_PATHS = ("key_file", "device_keys_dir", "password_file")
_DEFAULTS: Mapping[str, str] = {"broker": DEFAULT_BROKER, "fleet": DEFAULT_FLEET}


class FleetSettingsError(BitfleetError, ValueError):
    """A settings file that cannot be read, or a key or password file that is missing."""


def config_path() -> Path:
    """The laptop's ``fleet.toml`` (it need not exist)."""
    platformdirs = require("platformdirs", "train", "the fleet settings file")
    return Path(platformdirs.user_config_dir("bitfleet")) / "fleet.toml"


@dataclass(frozen=True)
class FleetSettings:
    """The resolved settings, and where each came from (``--broker``, ``BITFLEET_FLEET``...)."""

    broker: str
    fleet: str
    key_file: Path | None
    config: Path
    sources: Mapping[str, str]
    device_keys_dir: Path | None = None
    username: str | None = None
    password_file: Path | None = None

    def _ways(self, name: str, value: str) -> str:
        return (
            f"pass {_FLAGS[name]} {value}, set {ENV[name]}={value}, "
            f'or put {name} = "{value}" in {self.config}'
        )

    def require_key_file(self) -> Path:
        """The key file, or a one-line error that names every way to set it."""
        ways = self._ways("key_file", "PATH")
        if self.key_file is None:
            raise FleetSettingsError(f"no fleet key file given: {ways}")
        if not self.key_file.is_file():
            where = self.sources.get("key_file", "?")
            raise FleetSettingsError(
                f"fleet key file {self.key_file} (from {where}) does not exist: {ways}"
            )
        return self.key_file

    def keyring(self) -> Keyring:
        """The fleet key plus the ``<device>.key`` files of ``device_keys_dir``, if one is set.

        Read as the agent reads them, so a device that signs with its own key is verified
        here with the key it signs with. Errors are one line naming the file or folder.
        """
        from edge_agent.protocol import Keyring

        key = self.require_key_file()
        folder = ""
        if self.device_keys_dir is not None:
            if not self.device_keys_dir.is_dir():
                where = self.sources.get("device_keys_dir", "?")
                raise FleetSettingsError(
                    f"device keys folder {self.device_keys_dir} (from {where}) is not a folder: "
                    f"{self._ways('device_keys_dir', 'DIR')}"
                )
            folder = str(self.device_keys_dir)
        try:
            return Keyring.from_files(key, folder or None)
        except (OSError, ValueError) as err:
            raise FleetSettingsError(f"cannot use the keys ({err})") from None

    def password(self) -> str | None:
        """The broker password: the first line of ``password_file`` (None when none is set).

        Only the line ending is removed. A password needs a user name, and a set password
        file must exist and not be empty; each is a one-line error naming the fix.
        """
        if self.password_file is None:
            return None
        where = self.sources.get("password_file", "?")
        if self.username is None:
            raise FleetSettingsError(
                f"password file {self.password_file} (from {where}) needs a broker user name: "
                f"{self._ways('username', 'NAME')}"
            )
        try:
            text = self.password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            why = getattr(err, "strerror", None) or str(err)
            raise FleetSettingsError(
                f"cannot read password file {self.password_file} (from {where}): {why}"
            ) from None
        password = text.splitlines()[0] if text else ""
        if not password:
            raise FleetSettingsError(
                f"password file {self.password_file} (from {where}) is empty: its first line "
                "is the broker password"
            )
        return password


def _read_config(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise FleetSettingsError(f"cannot read {path}: {err}") from None
    unknown = sorted(set(data) - set(ENV))
    if unknown:
        raise FleetSettingsError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(ENV)}"
        )
    for name, value in data.items():
        if not isinstance(value, str) or not value:
            raise FleetSettingsError(f"{path}: {name} must be a non-empty string, got {value!r}")
    return dict(data)


def resolve(
    *,
    broker: str | None = None,
    fleet: str | None = None,
    key_file: str | os.PathLike[str] | None = None,
    device_keys_dir: str | os.PathLike[str] | None = None,
    username: str | None = None,
    password_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    config: Path | None = None,
) -> FleetSettings:
    """Each setting from the flags given, else ``env``, else ``config``, else the default.

    ``env`` defaults to ``os.environ`` and ``config`` to :func:`config_path`; an empty
    environment variable counts as unset. A relative path (``key_file``, ``device_keys_dir``,
    ``password_file``) in the config file is taken relative to the config file's folder.
    """
    environ = os.environ if env is None else env
    path = config_path() if config is None else config
    given = {
        "broker": broker,
        "fleet": fleet,
        "key_file": key_file,
        "device_keys_dir": device_keys_dir,
        "username": username,
        "password_file": password_file,
    }
    from_file: dict[str, str] | None = None
    values: dict[str, str | None] = {}
    sources: dict[str, str] = {}
    for name in ENV:
        flag_value = given[name]
        if flag_value is not None and str(flag_value):
            values[name], sources[name] = str(flag_value), _FLAGS[name]
            continue
        if environ.get(ENV[name]):
            values[name], sources[name] = environ[ENV[name]], ENV[name]
            continue
        if from_file is None:
            from_file = _read_config(path)
        if name in from_file:
            value = from_file[name]
            if name in _PATHS:
                given_path = Path(value).expanduser()
                value = str(given_path if given_path.is_absolute() else path.parent / given_path)
            values[name], sources[name] = value, str(path)
            continue
        default = _DEFAULTS.get(name)
        values[name] = default
        if default is not None:
            sources[name] = "default"

    def as_path(name: str) -> Path | None:
        value = values[name]
        return None if value is None else Path(value).expanduser()

    return FleetSettings(
        broker=str(values["broker"]),
        fleet=str(values["fleet"]),
        key_file=as_path("key_file"),
        config=path,
        sources=sources,
        device_keys_dir=as_path("device_keys_dir"),
        username=values["username"],
        password_file=as_path("password_file"),
    )
