"""What every `bitfleet fleet ...` subcommand shares: the sub-app, options and a client.

The sub-app, the connection options, the settings they resolve to, a connected client, and
the choice of devices: :func:`chosen` reads ``--to``/``--all`` before anything connects, and
:func:`targets` checks those devices against the fleet's retained states
(:func:`toolkit.fleet_targets.pick_devices`), its errors naming the key (:func:`key_name`).

Every subcommand takes the connection settings ``--broker``, ``--fleet`` and ``--key-file``,
after ``fleet`` or after the subcommand (the subcommand's win), and falls back to
``BITFLEET_BROKER``, ``BITFLEET_FLEET``, ``BITFLEET_KEY_FILE``, then ``fleet.toml`` in the
user's config folder, then the defaults (see :mod:`toolkit.fleet_settings`). The broker
account and the per-device keys (``--username``, ``--password-file``, ``--device-keys-dir``)
are given after ``fleet``, or by their ``BITFLEET_*`` variables or ``fleet.toml``. Each
subcommand lives in its own ``fleet_*_cmd`` module and registers itself on :data:`app`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import number

if TYPE_CHECKING:
    from toolkit.fleet import FleetClient
    from toolkit.fleet_settings import FleetSettings

app = typer.Typer(
    help=(
        "The running fleet: `bitfleet fleet ls` lists its devices. Connection settings: "
        "--broker/--fleet/--key-file, else BITFLEET_BROKER/BITFLEET_FLEET/BITFLEET_KEY_FILE, "
        "else fleet.toml in the user's config folder, else mqtt://127.0.0.1:1883 and fleet lab. "
        "A broker with accounts: --username/--password-file (BITFLEET_USERNAME, "
        "BITFLEET_PASSWORD_FILE); devices with their own keys: --device-keys-dir "
        "(BITFLEET_DEVICE_KEYS_DIR); `bitfleet fleet keys init` makes them all."
    ),
    no_args_is_help=True,
)

BrokerOpt = Annotated[
    str | None,
    typer.Option(
        "--broker", help="Broker URL (env BITFLEET_BROKER; default mqtt://127.0.0.1:1883)."
    ),
]
FleetOpt = Annotated[
    str | None, typer.Option("--fleet", help="Fleet name (env BITFLEET_FLEET; default lab).")
]
KeyFileOpt = Annotated[
    Path | None, typer.Option("--key-file", help="Fleet key file (env BITFLEET_KEY_FILE).")
]
UsernameOpt = Annotated[
    str | None,
    typer.Option("--username", help="Broker user name (env BITFLEET_USERNAME; default none)."),
]
PasswordFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--password-file",
        help="File whose first line is the broker password (env BITFLEET_PASSWORD_FILE).",
    ),
]
DeviceKeysDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--device-keys-dir",
        help="Folder of <device>.key files of devices that sign with their own key "
        "(env BITFLEET_DEVICE_KEYS_DIR).",
    ),
]
# the choice of devices (read by chosen) and --json, as the many-device commands spell them
ToOpt = Annotated[
    str | None,
    typer.Option("--to", metavar="ID[,ID]", help="The devices, by id, separated by commas."),
]
AllOpt = Annotated[bool, typer.Option("--all", help="Every device that is online now.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]

_CONNECT_S = 5.0  # how long to try the broker before saying it is unreachable


def timeout_opt(what: str, *, le: float = 600) -> Any:
    """The ``--timeout S`` option of a command that waits for ``what`` (seconds, over 0)."""
    return typer.Option(
        "--timeout",
        metavar="S",
        help=f"Seconds to wait for {what}.",
        callback=number(gt=0, le=le),
    )


@app.callback()
def _fleet(
    ctx: typer.Context,
    broker: BrokerOpt = None,
    fleet: FleetOpt = None,
    key_file: KeyFileOpt = None,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    device_keys_dir: DeviceKeysDirOpt = None,
) -> None:
    ctx.obj = {
        "broker": broker,
        "fleet": fleet,
        "key_file": key_file,
        "username": username,
        "password_file": password_file,
        "device_keys_dir": device_keys_dir,
    }


def settings(
    ctx: typer.Context | None, broker: str | None, fleet: str | None, key_file: Path | None
) -> FleetSettings:
    """The connection settings of a ``fleet`` subcommand (its flags, then ``fleet``'s)."""
    from toolkit.fleet_settings import resolve

    parent: dict[str, Any] = {}
    if ctx is not None and isinstance(ctx.obj, dict):
        parent = ctx.obj
    return resolve(
        broker=broker or parent.get("broker"),
        fleet=fleet or parent.get("fleet"),
        key_file=key_file or parent.get("key_file"),
        username=parent.get("username"),
        password_file=parent.get("password_file"),
        device_keys_dir=parent.get("device_keys_dir"),
    )


def connect(config: FleetSettings) -> FleetClient:
    """A connected client; a missing key or an unreachable broker is one line (cli_command)."""
    from toolkit.fleet import FleetClient

    client = FleetClient(
        config.broker,
        fleet=config.fleet,
        keyring=config.keyring(),
        username=config.username,
        password=config.password(),
    )
    # the transport logs each failed attempt; the error below says it once
    transport_log = logging.getLogger("edge_agent.transport")
    level = transport_log.level
    transport_log.setLevel(logging.ERROR)
    try:
        client.connect(timeout=_CONNECT_S)
    finally:
        transport_log.setLevel(level)
    return client


def key_name(config: FleetSettings) -> str:
    """The key a fleet command uses, for messages: its file and where that setting came from."""
    return f"the key {config.key_file} (from {config.sources.get('key_file', '?')})"


def chosen(to: str | None, everyone: bool) -> list[str] | None:
    """The ids ``--to`` names (None: ``--all``), checked before anything connects.

    Exactly one of the two is given, else a ValueError (one ``error:`` line) names both.
    """
    from toolkit.fleet_targets import parse_ids

    if to is not None and everyone:
        raise ValueError("pass --to ID[,ID] or --all, not both")
    if to is None and not everyone:
        raise ValueError("name the devices with --to ID[,ID], or pass --all for every device")
    return parse_ids(to) if to is not None else None


def targets(client: FleetClient, config: FleetSettings, ids: list[str] | None) -> list[str]:
    """The online devices a command goes to: ``ids``, or every online one for None (``--all``).

    An unknown or offline device, an empty fleet or a key the devices reject is one
    :class:`~toolkit.fleet.FleetError` naming ``config``'s key, before anything is sent.
    """
    from toolkit.fleet_targets import pick_devices

    return pick_devices(client, ids, everyone=ids is None, key=key_name(config))
