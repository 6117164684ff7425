"""`bitfleet fleet keys`: the fleet's secrets, made once: keys, broker accounts, device folders.

``keys init`` makes the fleet key, the broker's password and ACL files and the laptop's
account; ``keys add DEVICE...`` gives each device its own key, account and a folder to copy to
it. The work is :mod:`toolkit.fleet_keys`; this module prints what was written and what to do
next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ._common import cli_command, err_console, literal, print_json, say
from ._fleet import BrokerOpt, FleetOpt, app, settings

keys_app = typer.Typer(
    help=(
        "The fleet's secrets: `keys init` makes the fleet key, the broker's password and ACL "
        "files and the laptop's account; `keys add pi-01 pi-02` gives each device its own key, "
        "broker account and a folder to copy to it. Secrets are files of mode 0600."
    ),
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")

DirOpt = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="Key folder (default: `keys` beside fleet.toml, e.g. ~/.config/bitfleet/keys).",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document of the paths written.")
]


def _root(folder: Path | None) -> Path:
    from toolkit.fleet_keys import default_dir

    return (folder if folder is not None else default_dir()).expanduser().absolute()


@keys_app.command("init")
@cli_command
def init(
    folder: DirOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing fleet key and laptop password (device accounts stay).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make the fleet key, the broker's password and ACL files, and the laptop's account."""
    from toolkit.fleet_keys import OPERATOR, fleet_toml_lines, init_keys
    from toolkit.fleet_settings import config_path

    report = init_keys(_root(folder), force=force)
    keys = report.folder
    toml = fleet_toml_lines(keys, config_path())
    if as_json:
        print_json(
            {
                "dir": str(keys.root),
                "fleet_key": str(keys.fleet_key),
                "password_file": str(keys.password_file),
                "acl_file": str(keys.acl_file),
                "operator": OPERATOR,
                "operator_password_file": str(keys.operator_password),
                "kept_accounts": report.kept_accounts,
                "refreshed_devices": report.refreshed,
                "fleet_toml": toml,
            }
        )
        return
    root = literal(keys.root)
    say(f"wrote the fleet's secrets to {root}:")
    say(f"  {keys.fleet_key.name:<18} the fleet key (0600): the laptop's and every device's")
    say(f"  {keys.password_file.name:<18} Mosquitto password file: the account {OPERATOR}")
    say(f"  {keys.acl_file.name:<18} the ACL (ops/mosquitto/bitfleet.acl)")
    say(f"  {keys.operator_password.name:<18} the {OPERATOR} account's password (0600)")
    if report.kept_accounts:
        say(f"kept the device accounts {literal(', '.join(report.kept_accounts))}")
    say("next:")
    say(
        f"  1. broker: copy {literal(keys.password_file)} and {literal(keys.acl_file)} to "
        "/etc/mosquitto/ (ops/mosquitto/mosquitto.conf reads them there) and reload Mosquitto; "
        f"or try: bitfleet broker --password-file {literal(keys.password_file)} "
        f"--acl-file {literal(keys.acl_file)}"
    )
    say(f"  2. laptop: put these lines in {literal(config_path())}:")
    for line in toml:
        say(f"       {literal(line)}")
    say(
        "  3. devices: bitfleet fleet keys add pi-01 pi-02 --broker URL "
        "(the broker's address as the devices reach it)"
    )
    if report.refreshed:
        say(
            "  the device folders of "
            f"{literal(', '.join(report.refreshed))} hold the new fleet key: copy them again"
        )


_ADD_HELP = (
    "Give each device its own key, broker account and a folder to copy to it.\n\n"
    "The folder (agents/<id>: agent.toml, fleet.key, keys/) configures the device; its "
    "agent.toml names the broker and fleet of --broker/--fleet, BITFLEET_BROKER/BITFLEET_FLEET "
    "or fleet.toml: use the broker's address as the devices reach it."
)


@keys_app.command("add", help=_ADD_HELP)
@cli_command
def add(
    ctx: typer.Context,
    devices: Annotated[
        list[str],
        typer.Argument(
            metavar="DEVICE",
            help="Device ids (also their broker user names): A-Z a-z 0-9 _ . - only.",
            show_default=False,
        ),
    ],
    folder: DirOpt = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Give a device that already has one a new key and password."),
    ] = False,
    device_dir: Annotated[
        str,
        typer.Option(
            "--device-dir",
            help="Where each device folder goes on its device; agent.toml points there.",
        ),
    ] = "/etc/bitfleet",
    broker: BrokerOpt = None,
    fleet: FleetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make each device's key, account and folder (help: ``_ADD_HELP``)."""
    from edge_agent.broker import is_loopback
    from edge_agent.transport import parse_broker_url
    from toolkit.fleet_keys import add_devices

    config = settings(ctx, broker, fleet, None)
    report = add_devices(
        _root(folder),
        devices,
        broker=config.broker,
        fleet=config.fleet,
        device_dir=device_dir,
        force=force,
    )
    keys = report.folder
    if is_loopback(parse_broker_url(report.broker)[0]):
        err_console.print(
            f"[yellow]warning:[/] agent.toml names the broker {literal(report.broker)}, which on "
            "a device is the device itself: pass --broker with the address the devices reach",
            soft_wrap=True,
        )
    if as_json:
        rows: list[dict[str, Any]] = [
            {
                "id": device,
                "key_file": str(keys.device_key(device)),
                "folder": str(keys.agent_folder(device)),
                "config": str(keys.agent_folder(device) / "agent.toml"),
            }
            for device in report.devices
        ]
        print_json(
            {
                "dir": str(keys.root),
                "devices": rows,
                "password_file": str(keys.password_file),
                "broker": report.broker,
                "fleet": report.fleet,
                "device_dir": report.device_dir,
                "peers_to_update": report.peers,
            }
        )
        return
    say(f"added {literal(', '.join(report.devices))} to {literal(keys.root)}:")
    for device in report.devices:
        say(
            f"  {literal(keys.device_key(device).relative_to(keys.root))}: its own key "
            f"(the laptop verifies {literal(device)} with {literal(keys.device_keys)})"
        )
        say(
            f"  {literal(keys.agent_folder(device).relative_to(keys.root))}/: agent.toml "
            f"(broker account {literal(device)}), fleet.key, keys/: for {literal(device)}'s "
            f"{literal(report.device_dir)}"
        )
    say(f"  {keys.password_file.name}: the broker accounts {literal(', '.join(report.devices))}")
    first = report.devices[0]
    say("next:")
    say(
        f"  1. broker: copy {literal(keys.password_file)} to /etc/mosquitto/bitfleet.passwd and "
        "reload it (systemctl reload mosquitto); `bitfleet broker` reads it when it starts"
    )
    say(
        f"  2. each device, e.g. {literal(first)}: rsync -r --chmod=D0750,F0640 "
        f"--chown=root:bitfleet {literal(keys.agent_folder(first))}/ "
        f"root@{literal(first)}:{literal(report.device_dir)}/ then restart its agent "
        f"(bitfleet-agent run --config {literal(report.device_dir)}/agent.toml)"
    )
    if report.peers:
        say(
            f"  3. {literal(', '.join(report.peers))}: their folders now hold the new keys; copy "
            "each one's keys/ again and restart its agent, or it drops the new devices' frames"
        )
