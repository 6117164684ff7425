"""`bitfleet broker`: the embedded MQTT broker, in the foreground, for trials and small fleets.

It is amqtt, a pure-Python MQTT 3.1.1 broker: zero set-up, enough for a laptop and a handful of
devices. A real fleet runs Mosquitto (``ops/mosquitto``: config, password file, ACL) or, past
one broker, a cluster such as EMQX or HiveMQ. The embedded broker reads the same Mosquitto
password and ACL files, so rules written once hold on both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import cli_command, literal, say


@cli_command
def broker(
    host: Annotated[
        str, typer.Option(help="Address to listen on; other than loopback needs --password-file.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 1883,
    password_file: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="Mosquitto password file (mosquitto_passwd)."
        ),
    ] = None,
    acl_file: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Mosquitto ACL file (ops/mosquitto)."),
    ] = None,
) -> None:
    """Run the embedded MQTT broker until Ctrl-C (real fleets: Mosquitto, see ops/mosquitto)."""
    import asyncio

    from bitfleet.errors import require

    require("amqtt", "train", "the embedded broker")
    from edge_agent.broker import is_loopback, serve
    from edge_agent.broker_access import read_acl_file, read_password_file

    if not is_loopback(host) and password_file is None:
        raise ValueError(
            f"refusing to listen on {host} without --password-file: anyone who reaches it could "
            "command the fleet; add --password-file (and --acl-file), or keep 127.0.0.1"
        )
    if acl_file is not None and password_file is None:
        raise ValueError("--acl-file needs --password-file: ACL rules name authenticated users")
    if password_file is not None:
        read_password_file(password_file)  # refuse a bad file here, in one line
    if acl_file is not None:
        read_acl_file(acl_file)
    try:
        asyncio.run(
            serve(
                host,
                port,
                exit_on_stdin_eof=False,
                password_file=str(password_file) if password_file else None,
                acl_file=str(acl_file) if acl_file else None,
                on_ready=lambda: say(
                    f"broker listening on mqtt://{literal(host)}:{port} "
                    f"({'password file' if password_file else 'anonymous, loopback'}"
                    f"{', ACL' if acl_file else ''}); Ctrl-C stops it"
                ),
            )
        )
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    say("broker stopped")
