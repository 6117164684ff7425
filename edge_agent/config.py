r"""Agent settings: defaults, then ``agent.toml``, then ``BITFLEET_*`` variables, then flags.

One command line with no config file starts a working agent::

    bitfleet-agent run --broker mqtt://127.0.0.1:1883 --fleet lab --id pi-01 \\
        --state-dir ./state --artifact ./art --key-file fleet.key

Every key of ``ops/agent.toml`` can come from four places; a later one wins: the defaults
below, the TOML file (``--config``), an environment variable ``BITFLEET_<KEY>`` (upper case,
e.g. ``BITFLEET_HEARTBEAT_S=5``), and a command-line flag. Settings changed at run time with
the ``config.set`` command are stored in the state directory and applied over all of those, but
only for the keys in :data:`RUNTIME_KEYS` (the broker address or the device id cannot change
under a running agent). Learning settings (peers, merge mode, local steps...) are the
``learn_*`` keys; ``learn.start`` may override them for one run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bitfleet.errors import BitfleetError
from edge_agent.protocol import validate_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (Jetson's Ubuntu 22.04): the same parser, from PyPI
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["AgentConfig", "ConfigError", "LearnSettings", "load_config", "RUNTIME_KEYS"]


class ConfigError(BitfleetError, ValueError):
    """A setting that is missing, of the wrong type, or out of range (one line, names the key)."""


@dataclass
class LearnSettings:
    """How the device learns: the gossip simulator's settings, for one real node.

    The simulator's defaults merge a node with all its 8 neighbours at once (self weight 0.1).
    A real fleet has no fixed neighbour list: a device pushes to ``peers`` random online peers
    and merges as soon as ``trigger`` models are buffered, often a single one, so its own
    model keeps half the weight (0.5, the paper's code's choice) rather than being replaced.
    """

    peers: int = 2
    merge: str = "vc"
    self_weight: float = 0.5
    variance: str = "others"
    # VC's rescaling rule: "bitfleet" (every tensor of more than one element, ddof 1, eps) or
    # "dfl2" (weights only, ddof 0, no eps: the paper's first simulator); edge_agent.merge
    vc_rule: str = "bitfleet"
    # false: VC averages binary layers' latent weights without rescaling them (sign() ignores
    # their scale; see docs/reproductions/vanishing_variance.md)
    rescale_binary: bool = True
    trigger: int = 1
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    codec: str = "fp32"
    rounds: int = 0
    round_interval_s: float = 1.0

    def __post_init__(self) -> None:
        from edge_agent.codecs import CODECS
        from edge_agent.merge import RULES

        if self.merge not in ("vc", "avg"):
            raise ConfigError(f"learn merge must be 'vc' or 'avg', not {self.merge!r}")
        if self.codec not in CODECS:
            raise ConfigError(f"learn codec must be one of {', '.join(CODECS)}, not {self.codec!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"learn optimizer must be 'sgd' or 'adam', not {self.optimizer!r}")
        if self.variance not in ("others", "self", "conservative"):
            raise ConfigError("learn variance must be others, self or conservative")
        if self.vc_rule not in RULES:
            raise ConfigError(
                f"learn vc_rule must be one of {', '.join(RULES)}, not {self.vc_rule!r}"
            )
        if not 0.0 <= self.self_weight < 1.0:
            raise ConfigError(f"learn self_weight must be in [0, 1), got {self.self_weight}")
        for name in ("peers", "trigger", "local_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"learn {name} must be >= 1, got {getattr(self, name)}")
        if self.rounds < 0 or self.round_interval_s < 0 or self.lr <= 0:
            raise ConfigError("learn rounds and round_interval_s must be >= 0, lr > 0")

    def updated(self, values: Mapping[str, Any]) -> LearnSettings:
        """A copy with ``values`` applied (type-checked like the config file)."""
        known = {f.name: f for f in fields(self)}
        data = asdict(self)
        for key, value in values.items():
            if key not in known:
                raise ConfigError(
                    f"unknown learning setting {key!r}; known: {', '.join(sorted(known))}"
                )
            data[key] = _coerce(f"learn {key}", value, type(data[key]))
        return LearnSettings(**data)


@dataclass
class AgentConfig:
    """Every setting of one agent (the keys of ``ops/agent.toml``)."""

    broker: str = "mqtt://127.0.0.1:1883"
    fleet: str = "demo"
    id: str = ""
    state_dir: str = ""
    artifact: str = ""
    key_file: str = ""
    device_keys_dir: str = ""
    username: str = ""
    password: str = ""
    protocol: str = "3.1.1"
    ca_file: str = ""
    cert_file: str = ""
    client_key_file: str = ""
    heartbeat_s: float = 10.0
    chunk_bytes: int = 262144
    http_port: int = 8765
    data_dir: str = ""
    learn: bool = False
    threads: int = 1
    learning: LearnSettings = field(default_factory=LearnSettings)

    def check(self) -> AgentConfig:
        """Raise :class:`ConfigError` for the first unusable setting, naming the fix."""
        if not self.id:
            raise ConfigError("no device id: pass --id DEVICE (or set id in the config file)")
        for what, value in (("device id", self.id), ("fleet", self.fleet)):
            try:
                validate_name(value, what)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if not self.state_dir:
            raise ConfigError("no state directory: pass --state-dir DIR")
        if not self.key_file:
            raise ConfigError(
                "no fleet key: pass --key-file PATH (create one with: "
                "head -c 32 /dev/urandom > fleet.key)"
            )
        if self.protocol not in ("3.1.1", "5"):
            raise ConfigError(f"protocol must be '3.1.1' or '5', not {self.protocol!r}")
        if self.heartbeat_s <= 0:
            raise ConfigError(f"heartbeat_s must be > 0, got {self.heartbeat_s}")
        if not 1024 <= self.chunk_bytes <= 16 * 1024 * 1024:
            raise ConfigError(f"chunk_bytes must be in [1024, 16 MiB], got {self.chunk_bytes}")
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port must be in [0, 65535] (0 disables), got {self.http_port}")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.learn and not self.data_dir:
            raise ConfigError("learn is on but no data_dir is set: pass --data-dir DIR")
        return self

    def public(self) -> dict[str, Any]:
        """The settings without secrets, for ``status`` replies and logs."""
        data = asdict(self)
        data["password"] = "***" if self.password else ""
        return data


RUNTIME_KEYS = frozenset({"heartbeat_s", "learn", "threads", "data_dir"})
"""Top-level keys the ``config.set`` command may change (plus every ``learn_*`` key)."""

_LEARN_PREFIX = "learn_"


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert a TOML/env/flag value to the field's type, or raise ConfigError naming the key."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
    elif kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if kind is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key} must be a whole number, got {value!r}")
        return number
    elif kind is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key} must be {kind.__name__}, got {value!r}")


def apply(config: AgentConfig, values: Mapping[str, Any], source: str) -> AgentConfig:
    """Apply flat ``key -> value`` settings (``learn_*`` keys go to :class:`LearnSettings`)."""
    known = {f.name: f for f in fields(AgentConfig) if f.name != "learning"}
    learn: dict[str, Any] = {}
    for key, value in values.items():
        if key.startswith(_LEARN_PREFIX):
            learn[key[len(_LEARN_PREFIX) :]] = value
        elif key in known:
            setattr(config, key, _coerce(key, value, type(getattr(AgentConfig(), key))))
        else:
            raise ConfigError(
                f"unknown setting {key!r} in {source}; known: {', '.join(sorted(known))} "
                "and learn_* keys"
            )
    if learn:
        config.learning = config.learning.updated(learn)
    return config


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Build the effective config from the file, ``BITFLEET_*`` variables and flags (unchecked).

    Flags whose value is None were not given. A ``[learn]`` table in the file sets learning
    keys (``peers = 3`` there equals ``learn_peers = 3`` at top level).
    """
    config = AgentConfig()
    if path:
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {file} is not valid TOML: {err}") from None
        table = data.pop("learn", None)
        if isinstance(table, dict):
            data.update({f"{_LEARN_PREFIX}{k}": v for k, v in table.items()})
        elif table is not None:
            data["learn"] = table
        apply(config, data, str(file))
    env = os.environ if environ is None else environ
    settable = {f.name for f in fields(AgentConfig)} - {"learning"}
    from_env = {
        name: value
        for key, value in env.items()
        if key.startswith("BITFLEET_")
        and (
            (name := key[len("BITFLEET_") :].lower()) in settable or name.startswith(_LEARN_PREFIX)
        )
    }  # other BITFLEET_* variables (e.g. BITFLEET_ISA) belong to other parts
    apply(config, from_env, "BITFLEET_* environment variables")
    apply(config, {k: v for k, v in (flags or {}).items() if v is not None}, "flags")
    return config
