"""`bitfleet fleet learn start|stop` and `bitfleet fleet metrics`: the fleet's learning.

``learn start`` switches gossip learning on, on the devices named with ``--to`` or on every
online one (``--all``), with only the settings given on the command line overriding each
device's own (``learn_*`` keys of its agent.toml); ``learn stop`` switches it off after the
round in progress. ``metrics`` shows accuracy over rounds per device and the fleet mean, and
``--plot`` draws it. The work is :mod:`toolkit.fleet_targets` (which devices, sending to many)
and :mod:`toolkit.fleet_metrics` (the curves); this module is the command line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.table import Table

from ._common import cli_command, console, err_console, literal, print_json, say
from ._fleet import (
    AllOpt,
    BrokerOpt,
    FleetOpt,
    JsonOpt,
    KeyFileOpt,
    ToOpt,
    app,
    chosen,
    connect,
    settings,
    targets,
    timeout_opt,
)

if TYPE_CHECKING:
    from toolkit.fleet import FleetClient

learn_app = typer.Typer(
    help=(
        "Gossip learning on the devices: `learn start --all` switches it on, `learn stop --all` "
        "off. Devices learn from the local data in their data_dir."
    ),
    no_args_is_help=True,
)
app.add_typer(learn_app, name="learn")

_MAX_ROWS = 20  # rounds shown in the metrics table; longer runs show every k-th round


# ---------------------------------------------------------------------------- learn start
def _outcomes(results: Mapping[str, Any], errors: Mapping[str, str]) -> list[dict[str, Any]]:
    rows = [
        {"device": d, "ok": True, **(r if isinstance(r, dict) else {})} for d, r in results.items()
    ]
    rows += [{"device": d, "ok": False, "error": e} for d, e in errors.items()]
    return sorted(rows, key=lambda row: row["device"])


def _settings_text(values: Any) -> str:
    if not isinstance(values, Mapping):
        return "-"
    keys = ("merge", "peers", "local_steps", "rounds")
    return ", ".join(f"{k} {values[k]}" for k in keys if k in values)


def _outcome_table(
    rows: list[dict[str, Any]],
    title: str,
    detail: Callable[[dict[str, Any]], tuple[str, str]],
    header: str,
) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("device", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("round", justify="right")
    table.add_column(header)
    for row in rows:
        if row["ok"]:
            outcome, text = detail(row)
            table.add_row(
                literal(row["device"]),
                f"[green]{literal(outcome)}[/]",
                literal(row.get("round", "-")),
                literal(text),
            )
        else:
            table.add_row(
                literal(row["device"]), "[red]failed[/]", "-", f"[red]{literal(row['error'])}[/]"
            )
    return table


def _send(
    ctx: typer.Context,
    command: str,
    args: dict[str, Any],
    *,
    choice: tuple[str | None, bool],
    timeout: float,
    conn: tuple[str | None, str | None, Path | None],
    as_json: bool,
    detail: Callable[[dict[str, Any]], tuple[str, str]],
    header: str,
    then: Callable[[FleetClient, list[dict[str, Any]]], None] | None = None,
) -> None:
    """Send ``command`` to the chosen devices and print a row each; exit code 1 if any failed.

    ``choice`` is ``(--to, --all)``, ``conn`` the connection flags; the table is titled with the
    command's name, and ``detail(row)`` gives an answering device's outcome and the text of the
    last column, headed ``header``. ``then(client, rows)``, when given, runs before the client
    closes (and may mark rows failed), once every device has answered.
    """
    from toolkit.fleet_targets import send_all

    ids = chosen(*choice)
    config = settings(ctx, *conn)
    client = connect(config)
    try:
        devices = targets(client, config, ids)
        with err_console.status(f"{command} on {len(devices)} device(s)..."):
            results, errors = send_all(client, devices, command, args, timeout=timeout)
        rows = _outcomes(results, errors)
        if then is not None:
            then(client, rows)
    finally:
        client.close()
    if as_json:
        print_json(rows)
    else:
        console.print(_outcome_table(rows, command.replace(".", " "), detail, header))
    if any(not row["ok"] for row in rows):
        raise typer.Exit(1)


def _wait_for_runs(client: FleetClient, rows: list[dict[str, Any]]) -> None:
    """``learn start --wait``: a progress bar of rounds until every started run has ended.

    Each row that started gets ``final`` (its last learning status); a run that ended with an
    error becomes a failed row.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from toolkit.fleet_metrics import wait_for_runs

    started = {row["device"]: row for row in rows if row["ok"]}
    if not started:
        return
    unbounded = sorted(d for d, row in started.items() if not _rounds(row))
    if unbounded:
        raise ValueError(
            f"--wait needs runs that end, but {', '.join(unbounded)} learn(s) until learn stop "
            "(rounds 0); learning is on: pass --rounds N next time, or run bitfleet fleet "
            "learn stop"
        )
    first = {d: int(row.get("round") or 0) for d, row in started.items()}
    total = sum(max(0, _rounds(row) - first[d]) for d, row in started.items())
    columns = (TextColumn("learning"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"))
    with Progress(*columns, console=err_console, transient=True) as progress:
        bar = progress.add_task("rounds", total=total)

        def show(statuses: dict[str, dict[str, Any]]) -> None:
            done = sum(
                max(0, min(_rounds(started[d]), int(s.get("round") or 0)) - first[d])
                for d, s in statuses.items()
            )
            progress.update(bar, completed=done)

        finals = wait_for_runs(client, started, on_poll=show)
    for device, status in finals.items():
        row = started[device]
        row["final"] = {"round": status.get("round"), "accuracy": status.get("accuracy")}
        if status.get("error"):
            row.update(ok=False, error=f"learning stopped: {status['error']}")


def _rounds(row: Mapping[str, Any]) -> int:
    values = row.get("settings")
    rounds = values.get("rounds") if isinstance(values, Mapping) else None
    return rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else 0


def _started(row: dict[str, Any]) -> tuple[str, str]:
    final = row.get("final")
    if isinstance(final, Mapping):
        accuracy = final.get("accuracy")
        shown = f"{accuracy:.3f}" if isinstance(accuracy, int | float) else "-"
        return "finished", f"round {final.get('round')}, accuracy {shown}"
    return "learning", _settings_text(row.get("settings"))


@learn_app.command(
    "start",
    epilog=(
        "Example: bitfleet fleet learn start --all --merge vc --rounds 20. Each device answers "
        "with its starting round and settings, or why it cannot learn (no data_dir, no model "
        "with a network spec, learning already on); exit code 1 if any failed."
    ),
)
@cli_command
def learn_start(
    ctx: typer.Context,
    to: ToOpt = None,
    everyone: AllOpt = False,
    merge: Annotated[
        str | None,
        typer.Option(
            "--merge", help="How received models are merged: vc (variance-corrected) or avg."
        ),
    ] = None,
    vc_rule: Annotated[
        str | None,
        typer.Option(
            "--vc-rule",
            help="VC's rescaling rule: bitfleet (every tensor, sample variance, epsilon) or dfl2 "
            "(weights only, population variance, the paper's first simulator).",
        ),
    ] = None,
    peers: Annotated[
        int | None, typer.Option("--peers", min=1, help="Peers each round's model is pushed to.")
    ] = None,
    local_steps: Annotated[
        int | None,
        typer.Option("--local-steps", min=1, help="Optimizer steps on local data per round."),
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option("--rounds", min=0, help="Stop after this many rounds (0: until learn stop)."),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Wait, with a progress bar, until every run has reached its rounds; then show "
            "each device's final round and accuracy (Ctrl-C stops waiting, not learning).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    timeout: Annotated[
        float, timeout_opt("each device's answer (a device loads torch on its first start)")
    ] = 30.0,
    broker: BrokerOpt = None,
    fleet: FleetOpt = None,
    key_file: KeyFileOpt = None,
) -> None:
    """Start gossip learning on devices (--to or --all); unset settings stay the device's own."""
    from edge_agent.protocol import Command

    if wait and rounds == 0:
        raise typer.BadParameter("--wait needs runs that end: pass --rounds N (N > 0)")
    if merge is not None and merge not in ("vc", "avg"):
        raise typer.BadParameter(f"--merge must be vc or avg, got {merge!r}")
    if vc_rule is not None and vc_rule not in ("bitfleet", "dfl2"):
        raise typer.BadParameter(f"--vc-rule must be bitfleet or dfl2, got {vc_rule!r}")
    overrides = {
        key: value
        for key, value in (
            ("merge", merge),
            ("vc_rule", vc_rule),
            ("peers", peers),
            ("local_steps", local_steps),
            ("rounds", rounds),
        )
        if value is not None
    }
    _send(
        ctx,
        Command.LEARN_START,
        overrides,
        choice=(to, everyone),
        timeout=timeout,
        conn=(broker, fleet, key_file),
        as_json=as_json,
        detail=_started,
        header="settings / error",
        then=_wait_for_runs if wait else None,
    )


@learn_app.command(
    "stop",
    epilog=(
        "Example: bitfleet fleet learn stop --all. Each device checkpoints what it learned and "
        "keeps serving; learn start resumes from there."
    ),
)
@cli_command
def learn_stop(
    ctx: typer.Context,
    to: ToOpt = None,
    everyone: AllOpt = False,
    as_json: JsonOpt = False,
    timeout: Annotated[
        float, timeout_opt("each device's answer (it finishes the round in progress)")
    ] = 60.0,
    broker: BrokerOpt = None,
    fleet: FleetOpt = None,
    key_file: KeyFileOpt = None,
) -> None:
    """Stop gossip learning on devices (--to or --all) after the round in progress."""
    from edge_agent.protocol import Command

    _send(
        ctx,
        Command.LEARN_STOP,
        {},
        choice=(to, everyone),
        timeout=timeout,
        conn=(broker, fleet, key_file),
        as_json=as_json,
        detail=lambda row: ("stopped" if row.get("stopped") else "was not learning", ""),
        header="error",
    )


# -------------------------------------------------------------------------------- metrics
def shown_rounds(rounds: list[int], max_rows: int = _MAX_ROWS) -> tuple[list[int], int]:
    """The rounds a table of at most ``max_rows`` rows shows: every k-th, and always the last."""
    if len(rounds) <= max_rows:
        return rounds, 1
    step = math.ceil((len(rounds) - 1) / (max_rows - 1))
    picked = rounds[::step]
    if picked[-1] != rounds[-1]:
        picked.append(rounds[-1])
    return picked, step


def metrics_table(
    metrics: Mapping[str, Any], max_rows: int = _MAX_ROWS, width: int | None = None
) -> Table | None:
    """Rounds as rows, one column per device and one for the fleet mean (None: no rounds).

    When a column per device would not fit ``width`` characters, the columns are the fleet's
    lowest, mean and highest accuracy and how many devices reported the round instead.
    """
    from toolkit.fleet_metrics import mean_by_round

    per_device: Mapping[str, Any] = metrics.get("devices") or {}
    # round -> accuracy per device, a repeated round's latest entry winning (as in the mean)
    reported = {
        device: {e["round"]: e["accuracy"] for e in entries if e.get("accuracy") is not None}
        for device, entries in sorted(per_device.items())
    }
    by_device = {device: rounds for device, rounds in reported.items() if rounds}
    mean = {m["round"]: m for m in (metrics.get("mean") or mean_by_round(per_device))}
    if not mean:
        return None
    rounds, step = shown_rounds(sorted(mean), max_rows)
    table = Table(
        title="accuracy over rounds",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("round", justify="right", no_wrap=True)
    needed = 20 + sum(max(len(device), 5) + 2 for device in by_device)
    wide = width is None or needed <= width
    notes = []
    if wide:
        for device in by_device:
            table.add_column(literal(device), justify="right", no_wrap=True)
        table.add_column("mean", justify="right", no_wrap=True, style="bold")
    else:
        for column in ("lowest", "mean", "highest", "devices"):
            style = "bold" if column == "mean" else None
            table.add_column(column, justify="right", no_wrap=True, style=style)
        notes.append(
            f"{len(by_device)} devices: too many columns for this terminal; --to picks "
            "devices, --json has them all"
        )
    for r in rounds:
        m = mean[r]
        values = [by_device[d].get(r) for d in by_device]
        if wide:
            cells = ["-" if v is None else f"{v:.3f}" for v in values]
            devices = "" if m["devices"] == len(by_device) else f" ({m['devices']})"
            table.add_row(str(r), *cells, f"{m['accuracy']:.3f}{devices}")
        else:
            present = [v for v in values if v is not None]
            table.add_row(
                str(r),
                f"{min(present):.3f}",
                f"{m['accuracy']:.3f}",
                f"{max(present):.3f}",
                str(m["devices"]),
            )
    if step > 1:
        notes.append(f"rounds in steps of {step} (of {len(mean)}; --json has them all)")
    if wide and any(m["devices"] != len(by_device) for m in mean.values()):
        notes.append("(n): the mean of the n devices that reported that round")
    idle = [device for device, rounds in reported.items() if not rounds]
    if idle:
        notes.append(f"no rounds yet: {', '.join(idle)}")
    if notes:
        table.caption = literal("\n".join(notes))
        table.min_width = max(len(note) for note in notes)  # a narrow table: no wrapped notes
    return table


@app.command(
    "metrics",
    epilog=(
        "Example: bitfleet fleet metrics --plot fleet.png. The mean of a round averages the "
        "devices that reported it; a long run shows every k-th round (--json has all). Exit "
        "code 1 if a device did not answer (the others are still shown)."
    ),
)
@cli_command
def metrics(
    ctx: typer.Context,
    to: ToOpt = None,
    everyone: Annotated[
        bool, typer.Option("--all", help="Every device that is online now (the default).")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", metavar="PNG", help="Also draw the curves into this PNG file."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the collected metrics (per device, mean, errors)."),
    ] = False,
    timeout: Annotated[float, timeout_opt("each device's answer (all are asked at once)")] = 10.0,
    broker: BrokerOpt = None,
    fleet: FleetOpt = None,
    key_file: KeyFileOpt = None,
) -> None:
    """Accuracy over learning rounds per device, and the fleet mean (all online by default)."""
    from toolkit.fleet_metrics import collect_metrics, plot_metrics

    if plot is not None and plot.is_dir():
        raise ValueError(f"--plot {plot} is a folder; name the PNG file to write, e.g. fleet.png")
    ids = chosen(to, everyone or to is None)
    config = settings(ctx, broker, fleet, key_file)
    client = connect(config)
    try:
        devices = targets(client, config, ids)
        with err_console.status(f"asking {len(devices)} device(s) for their metrics..."):
            collected = collect_metrics(client, devices, timeout=timeout)
    finally:
        client.close()
    out = err_console if as_json else console
    if as_json:
        print_json(collected)
    else:
        table = metrics_table(collected, width=console.width)
        if table is None:
            who = ", ".join(collected["devices"]) or "no device"
            say(
                f"no learning round reported yet by {literal(who)}; start learning with "
                "bitfleet fleet learn start --all"
            )
        else:
            console.print(table)
    for device, message in collected["errors"].items():
        err_console.print(f"[red]{literal(device)}:[/] {literal(message)}", soft_wrap=True)
    if plot is not None:
        written = plot_metrics(collected, plot)
        out.print(f"wrote {literal(written)}", soft_wrap=True)
    if collected["errors"]:
        raise typer.Exit(1)
