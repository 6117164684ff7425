r"""``bitfleet-agent``: the device daemon's command line.

``bitfleet-agent run`` starts an agent from ``--config agent.toml``, ``BITFLEET_*`` environment
variables and flags (later wins; see :mod:`edge_agent.config`). One command line with no config
file is enough::

    bitfleet-agent run --broker mqtt://127.0.0.1:1883 --fleet lab --id pi-01 \\
        --state-dir ./state --artifact ./artifact --key-file fleet.key

``bitfleet-agent config`` prints the settings the agent would run with (secrets masked).

Every expected failure (a :class:`~bitfleet.errors.BitfleetError`) ends the command with one
``error:`` line on stderr and exit code 1, never a traceback; ``bitfleet-agent --debug ...``
shows the traceback instead, as ``bitfleet --debug`` does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bitfleet.errors import BitfleetError
from edge_agent.config import load_config
from edge_agent.daemon import exec_daemon, serve

app = typer.Typer(
    name="bitfleet-agent",
    help="Serve a bitfleet model on this device and gossip-learn with the fleet over MQTT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="agent.toml (see ops/agent.toml).")
]
BrokerOpt = Annotated[str | None, typer.Option(help="mqtt://host:port or mqtts://host:port (TLS).")]
FleetOpt = Annotated[str | None, typer.Option(help="Fleet name (topic root bitfleet/FLEET/).")]
IdOpt = Annotated[str | None, typer.Option("--id", help="This device's id, unique in the fleet.")]
StateOpt = Annotated[
    str | None, typer.Option(help="State directory: artifacts, checkpoints, counters.")
]
ArtifactOpt = Annotated[
    str | None, typer.Option(help="Artifact (dir or .tar) to serve when the state has none yet.")
]
KeyOpt = Annotated[
    str | None,
    typer.Option(help="Fleet HMAC key file (>= 32 bytes: head -c 32 /dev/urandom)."),
]
DeviceKeysOpt = Annotated[
    str | None, typer.Option(help="Directory of per-device keys (<device>.key), optional.")
]
ChunkOpt = Annotated[int | None, typer.Option(help="Largest MQTT payload (bigger: chunked).")]
DataOpt = Annotated[
    str | None, typer.Option(help="Local training data (train.safetensors with x and y).")
]
LearnOpt = Annotated[
    bool | None, typer.Option("--learn/--no-learn", help="Gossip-learn from the start.")
]
HttpOpt = Annotated[
    int | None, typer.Option(help="Loopback HTTP port for local inference (0: off).")
]
HeartbeatOpt = Annotated[float | None, typer.Option(help="Seconds between telemetry messages.")]
UserOpt = Annotated[str | None, typer.Option(help="MQTT user name.")]
PasswordOpt = Annotated[
    str | None, typer.Option(help="MQTT password (prefer BITFLEET_PASSWORD or the config file).")
]
ProtocolOpt = Annotated[str | None, typer.Option(help="MQTT version: 3.1.1 or 5.")]
CaOpt = Annotated[str | None, typer.Option(help="CA file for mqtts://.")]
CertOpt = Annotated[str | None, typer.Option(help="Client certificate for mqtts://.")]
ClientKeyOpt = Annotated[str | None, typer.Option(help="Client private key for mqtts://.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for inference.")]
LogOpt = Annotated[str, typer.Option(help="Log level: debug, info, warning, error.")]


_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")
    ] = False,
) -> None:
    _state["debug"] = debug


def _flags(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(1)


@app.command()
def run(
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    fleet: FleetOpt = None,
    device_id: IdOpt = None,
    state_dir: StateOpt = None,
    artifact: ArtifactOpt = None,
    key_file: KeyOpt = None,
    device_keys_dir: DeviceKeysOpt = None,
    chunk_bytes: ChunkOpt = None,
    data_dir: DataOpt = None,
    learn: LearnOpt = None,
    http_port: HttpOpt = None,
    heartbeat_s: HeartbeatOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    protocol: ProtocolOpt = None,
    ca_file: CaOpt = None,
    cert_file: CertOpt = None,
    client_key_file: ClientKeyOpt = None,
    threads: ThreadsOpt = None,
    log_level: LogOpt = "info",
) -> None:
    """Run the agent until SIGTERM or Ctrl-C (then: checkpoint, publish offline, exit 0)."""
    flags = _flags(
        broker=broker,
        fleet=fleet,
        id=device_id,
        state_dir=state_dir,
        artifact=artifact,
        key_file=key_file,
        device_keys_dir=device_keys_dir,
        chunk_bytes=chunk_bytes,
        data_dir=data_dir,
        learn=learn,
        http_port=http_port,
        heartbeat_s=heartbeat_s,
        username=username,
        password=password,
        protocol=protocol,
        ca_file=ca_file,
        cert_file=cert_file,
        client_key_file=client_key_file,
        threads=threads,
    )
    config_path = str(config) if config is not None else None
    debug = _state["debug"]
    if _as_program:
        # the daemon leaves typer, click and pydantic behind: see edge_agent.daemon
        exec_daemon(config_path, flags, log_level, debug)
    raise typer.Exit(serve(config_path, flags, log_level, debug))


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    fleet: FleetOpt = None,
    device_id: IdOpt = None,
    state_dir: StateOpt = None,
    key_file: KeyOpt = None,
) -> None:
    """Print the effective settings as JSON (file, then BITFLEET_* variables, then flags)."""
    flags = _flags(broker=broker, fleet=fleet, id=device_id, state_dir=state_dir, key_file=key_file)
    try:
        effective = load_config(config, flags=flags)
    except BitfleetError as err:
        if _state["debug"]:
            raise
        _fail(str(err))
    typer.echo(json.dumps(effective.public(), indent=2))


_as_program = False  # True when main() runs as the program, not inside a test's CliRunner


def main() -> None:
    """Console-script entry point."""
    global _as_program
    _as_program = True
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
