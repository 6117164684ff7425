"""Where the laptop finds its fleet: broker URL, fleet name and key file.

Every ``bitfleet fleet`` command resolves each setting the same way, first match wins:

1. its flag (``--broker``, ``--fleet``, ``--key-file``);
2. the environment (``BITFLEET_BROKER``, ``BITFLEET_FLEET``, ``BITFLEET_KEY_FILE``);
3. ``fleet.toml`` in the user's config folder (``platformdirs.user_config_dir("bitfleet")``,
   e.g. ``~/.config/bitfleet/fleet.toml`` on Linux)::

       broker = "mqtt://10.0.0.2:1883"
       fleet = "lab"
       key_file = "fleet.key"     # relative to the folder of fleet.toml; ~ works too

4. the defaults: ``mqtt://127.0.0.1:1883`` and fleet ``lab``; the key file has no default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bitfleet.errors import BitfleetError, require

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
}
_FLAGS: Mapping[str, str] = {"broker": "--broker", "fleet": "--fleet", "key_file": "--key-file"}


class FleetSettingsError(BitfleetError, ValueError):
    """A settings file that cannot be read, or a key file that is missing."""


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

    def require_key_file(self) -> Path:
        """The key file, or a one-line error that names every way to set it."""
        ways = (
            f"pass --key-file PATH, set {ENV['key_file']}=PATH, "
            f'or put key_file = "PATH" in {self.config}'
        )
        if self.key_file is None:
            raise FleetSettingsError(f"no fleet key file given: {ways}")
        if not self.key_file.is_file():
            where = self.sources.get("key_file", "?")
            raise FleetSettingsError(
                f"fleet key file {self.key_file} (from {where}) does not exist: {ways}"
            )
        return self.key_file


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
            f"{path}: unknown setting(s) {', '.join(unknown)}; known: broker, fleet, key_file"
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
    env: Mapping[str, str] | None = None,
    config: Path | None = None,
) -> FleetSettings:
    """Each setting from the flags given, else ``env``, else ``config``, else the default.

    ``env`` defaults to ``os.environ`` and ``config`` to :func:`config_path`; an empty
    environment variable counts as unset. A relative ``key_file`` in the config file is taken
    relative to the config file's folder.
    """
    environ = os.environ if env is None else env
    path = config_path() if config is None else config
    given = {"broker": broker, "fleet": fleet, "key_file": key_file}
    from_file: dict[str, str] | None = None
    values: dict[str, str | None] = {}
    sources: dict[str, str] = {}
    for name in ("broker", "fleet", "key_file"):
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
            if name == "key_file":
                given_key = Path(value).expanduser()
                value = str(given_key if given_key.is_absolute() else path.parent / given_key)
            values[name], sources[name] = value, str(path)
            continue
        default = {"broker": DEFAULT_BROKER, "fleet": DEFAULT_FLEET}.get(name)
        values[name] = default
        if default is not None:
            sources[name] = "default"
    key = values["key_file"]
    return FleetSettings(
        broker=str(values["broker"]),
        fleet=str(values["fleet"]),
        key_file=None if key is None else Path(key).expanduser(),
        config=path,
        sources=sources,
    )
