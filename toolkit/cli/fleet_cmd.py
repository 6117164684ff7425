"""`bitfleet fleet ls`: the fleet's devices, from retained state and telemetry."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.live import Live
from rich.table import Table

from ._common import cli_command, console, err_console, literal, number, print_json, say

if TYPE_CHECKING:
    from toolkit.fleet import FleetClient
    from toolkit.fleet_settings import FleetSettings

from ._fleet import BrokerOpt, FleetOpt, KeyFileOpt, app, connect, key_name, settings

_REFRESH_S = 1.0  # --watch redraw interval


# ----------------------------------------------------------------------------------- ls
def _age(now: float, ts: Any) -> float | None:
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return None
    return round(max(0.0, now - float(ts)), 1)


def _dropped(drops: Any) -> int | None:
    if not isinstance(drops, dict):
        return None
    return sum(v for v in drops.values() if isinstance(v, int) and not isinstance(v, bool))


def device_rows(client: FleetClient, now: float | None = None) -> list[dict[str, Any]]:
    """One row per device: its retained state and its latest telemetry (None where unknown).

    ``last_seen_s`` is the age of the newest frame from the device: its latest heartbeat,
    or its retained state when no heartbeat has arrived yet.
    """
    now = time.time() if now is None else now
    rows = []
    for device, state in sorted(client.devices().items()):
        tele = client.telemetry(device) or {}
        learning: dict[str, Any] = tele.get("learning") or {}
        if not isinstance(learning, dict):
            learning = {}
        stamps = [t for t in (state.get("ts"), tele.get("ts")) if isinstance(t, int | float)]
        rows.append(
            {
                "id": device,
                "status": state.get("status"),
                "last_seen_s": _age(now, max(stamps)) if stamps else None,
                "model": state.get("model"),
                "version": state.get("version"),
                "learning": bool(state.get("learning")),
                "round": learning.get("round"),
                "accuracy": learning.get("accuracy"),
                "rss_mb": round(tele["rss_mb"], 1)
                if isinstance(tele.get("rss_mb"), int | float)
                else None,
                "dropped": _dropped(tele.get("drops")),
                "telemetry": bool(tele),
            }
        )
    return rows


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else literal(fmt.format(value))


def _table(rows: list[dict[str, Any]], config: FleetSettings) -> Table:
    table = Table(
        title=f"fleet {literal(config.fleet)} at {literal(config.broker)}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in ("device", "status", "seen", "model", "version", "round", "accuracy"):
        table.add_column(column, no_wrap=column in ("status", "seen"))
    for column in ("RSS", "dropped"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        colour = "green" if row["status"] == "online" else "red"
        accuracy = row["accuracy"]
        table.add_row(
            literal(row["id"]),
            f"[{colour}]{literal(row['status'])}[/]",
            _cell(row["last_seen_s"], "{:.0f}s ago"),
            _cell(row["model"]),
            _cell(row["version"]),
            _cell(row["round"]),
            "-" if not isinstance(accuracy, int | float) else f"{accuracy:.3f}",
            _cell(row["rss_mb"], "{:.0f}MB"),
            _cell(row["dropped"]),
        )
    return table


def _wait_for_telemetry(client: FleetClient, seconds: float) -> None:
    """Up to ``seconds``, until every online device has sent a heartbeat."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        waiting = [
            d
            for d, s in client.devices().items()
            if s.get("status") == "online" and client.telemetry(d) is None
        ]
        if not waiting:
            return
        time.sleep(0.05)


def _tick(seconds: float) -> None:
    time.sleep(seconds)


@app.command("ls")
@cli_command
def ls(
    ctx: typer.Context,
    watch: Annotated[
        bool, typer.Option("--watch", help="Redraw every second until Ctrl-C.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list.")] = False,
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            metavar="S",
            help=(
                "Seconds to wait for heartbeats before printing (devices send one every "
                "heartbeat_s, 10 s by default); stops early once every online device has sent one."
            ),
            callback=number(ge=0, le=3600),
        ),
    ] = 2.0,
    broker: BrokerOpt = None,
    fleet: FleetOpt = None,
    key_file: KeyFileOpt = None,
) -> None:
    """List the fleet's devices: status, last heartbeat, model, learning, RSS, dropped frames."""
    from toolkit.fleet_targets import key_trouble

    if watch and as_json:
        raise typer.BadParameter("--watch draws a table; leave it out for --json")
    config = settings(ctx, broker, fleet, key_file)
    client = connect(config)
    try:
        _wait_for_telemetry(client, wait)
        rows = device_rows(client)
        trouble = key_trouble(client, key_name(config))
        if not rows and trouble is not None:
            raise ValueError(f"no device on fleet {config.fleet} could be read: {trouble}")
        if trouble is not None:
            err_console.print(f"[yellow]warning:[/] {literal(trouble)}", soft_wrap=True)
        if as_json:
            print_json(rows)
        elif watch:
            _watch(client, config)
        elif not rows:
            say(
                f"no device has announced itself on fleet {literal(config.fleet)} "
                f"at {literal(config.broker)}"
            )
        else:
            console.print(_table(rows, config))
    finally:
        client.close()


def _watch(client: FleetClient, config: FleetSettings) -> None:
    def view() -> Table:
        table = _table(device_rows(client), config)
        if not table.row_count:
            table.caption = "no device has announced itself yet"
        return table

    try:
        with Live(view(), console=console, auto_refresh=False) as live:
            while True:
                _tick(_REFRESH_S)
                live.update(view(), refresh=True)
    except KeyboardInterrupt:
        pass
