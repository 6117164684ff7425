"""`bitfleet fleet deploy | rollback | history`: staged rollouts, rollbacks, each device's versions.

``deploy`` is :func:`toolkit.rollout.rollout` with a progress bar per wave (on stderr) and a table
of outcomes; ``rollback`` sends every target back to its last-good model; ``history`` asks each
device for its deploys and rollbacks (the agent's ``history`` command). Each command checks its
targets against the devices' retained states before it sends anything: an unknown id, or a key
the devices reject, is one line and exit code 1.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich import box
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
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
    from toolkit.fleet_settings import FleetSettings
    from toolkit.rollout import RolloutEvent, RolloutResult

AnswerTimeoutOpt = Annotated[float, timeout_opt("each device's answer", le=3600)]

_COLOURS = {
    "deployed": "green",
    "rolled_back": "yellow",
    "failed": "red",
    "offline": "red",
    "skipped": "dim",
}


# --------------------------------------------------------------------------------- inputs
def parse_canary(text: str) -> float:
    """``"10%"`` or ``"10"`` (percent) -> 0.1; a ValueError of one line outside (0%, 100%]."""
    raw = text.strip().removesuffix("%").strip()
    try:
        percent = float(raw)
    except ValueError:
        raise ValueError(
            f"--canary takes a percentage of the online targets, such as 10% or 25; got {text!r}"
        ) from None
    if not (math.isfinite(percent) and 0 < percent <= 100):
        raise ValueError(
            f"--canary must be over 0% and at most 100% of the online targets, got {text}"
        )
    return percent / 100


def _deploy_targets(client: FleetClient, config: FleetSettings, ids: list[str] | None) -> list[str]:
    """The ``--to`` ids, or for None (``--all``) every device of the fleet, offline ones too.

    Devices whose frames fail verification are included, so that the rollout's check of its
    targets names the key rather than an empty fleet.
    """
    if ids is not None:
        return ids
    everyone = sorted(set(client.devices()) | set(client.unverified()))
    if not everyone:
        raise ValueError(
            f"no device has announced itself on fleet {config.fleet} at {config.broker}: "
            "nothing to deploy to (start an agent with bitfleet-agent run, or check --fleet)"
        )
    return everyone


def _fail(message: str) -> NoReturn:
    """``error: message`` on stderr, after the results, and exit code 1."""
    err_console.print(f"[bold red]error:[/] {literal(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


# ---------------------------------------------------------------------------------- deploy
class _Bars:
    """A progress bar per wave (and for waiting and rolling back), fed by rollout events.

    The display starts with the first event, so that an error raised before anything was sent
    is the only line on stderr; :meth:`stop` ends it.
    """

    def __init__(self) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
        )
        self.tasks: dict[Any, TaskID] = {}
        self.labels: dict[Any, str] = {}
        self.failed: dict[Any, int] = {}
        self.started = False

    def stop(self) -> None:
        if self.started:
            self.progress.stop()

    def __call__(self, event: RolloutEvent) -> None:
        if not self.started:
            self.started = True
            self.progress.start()
        kind = event.kind
        if kind == "waiting":
            who = literal(", ".join(event.devices))
            self._add("waiting", f"waiting for {who} to come online", None)
        elif kind == "wave_started":
            self._close("waiting")
            label = "canary" if event.wave == 0 else f"wave {event.wave}"
            self._add(event.wave, label, len(event.devices))
        elif kind == "device_done" and event.wave in self.tasks:
            self._advance(event.wave, event.outcome == "failed")
        elif kind == "rolling_back":
            self._add("rollback", "rolling back", len(event.devices))
        elif kind == "device_rolled_back":
            self._advance("rollback", event.outcome == "failed")

    def _add(self, key: Any, label: str, total: int | None) -> None:
        self.labels[key] = label
        self.tasks[key] = self.progress.add_task(label, total=total)

    def _advance(self, key: Any, failed: bool) -> None:
        task = self.tasks[key]
        if failed:
            self.failed[key] = self.failed.get(key, 0) + 1
            label = f"{self.labels[key]} [red]({self.failed[key]} failed)[/]"
            self.progress.update(task, description=label)
        self.progress.advance(task)

    def _close(self, key: Any) -> None:
        task = self.tasks.pop(key, None)
        if task is not None:
            self.progress.update(task, total=1, completed=1)


def _outcome_table(result: RolloutResult) -> Table:
    art = result.artifact
    table = Table(
        title=f"{literal(art['name'])} {literal(art['version'])} ({art['sha256'][:12]})",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in ("device", "wave", "outcome", "error"):
        table.add_column(column, no_wrap=column != "error")
    for entry in result.devices:
        wave = "-" if entry.wave is None else "canary" if entry.wave == 0 else str(entry.wave)
        colour = _COLOURS.get(entry.outcome, "white")
        table.add_row(
            literal(entry.id),
            wave,
            f"[{colour}]{literal(entry.outcome)}[/]",
            literal(entry.error or ""),
        )
    return table


def _summary(result: RolloutResult) -> str:
    counts: dict[str, int] = {}
    for entry in result.devices:
        counts[entry.outcome] = counts.get(entry.outcome, 0) + 1
    parts = ", ".join(f"{n} {outcome.replace('_', ' ')}" for outcome, n in sorted(counts.items()))
    art = result.artifact
    return f"{literal(art['name'])} {literal(art['version'])}: {parts}"


_DEPLOY_HELP = (
    "Roll an artifact out: a canary first, then waves; roll back when devices fail.\n\n"
    "Each device installs the artifact, loads it and health-checks it (finite logits on a "
    "probe batch) before it serves it. When more than --max-failures devices fail (an error, "
    "or no answer within --timeout), the rollout stops: the devices that took the artifact go "
    "back to the model they served before, and the rest are skipped. Exit code 1 when it "
    "stopped.\n\n"
    "Example: bitfleet fleet deploy runs/art-v2 --all --canary 25%"
)
_ROLLBACK_HELP = (
    "Send devices back to their last-good model (the one they served before the last "
    "deploy).\n\n"
    "A second rollback returns to the newer model again: the two swap. Exit code 1 when any "
    "device did not roll back (offline, no last-good model, no answer).\n\n"
    "Example: bitfleet fleet rollback --to pi-01,pi-02"
)
_HISTORY_HELP = (
    "Each device's versions: what it serves, its last-good model, its deploys and "
    "rollbacks.\n\n"
    "The history lives in each device's state directory, so a device must be online to "
    "answer. --json prints a list of {id, active, last_good, events, error}.\n\n"
    "Example: bitfleet fleet history pi-01"
)


@app.command("deploy", help=_DEPLOY_HELP)
@cli_command
def deploy(
    ctx: typer.Context,
    artifact: Annotated[
        Path,
        typer.Argument(
            help="The artifact to roll out: a directory from `bitfleet export`, or a .tar of one."
        ),
    ],
    to: ToOpt = None,
    every: Annotated[
        bool, typer.Option("--all", help="Every device of the fleet (offline ones reported).")
    ] = False,
    canary: Annotated[
        str,
        typer.Option(
            "--canary",
            metavar="PCT",
            help=(
                "Share of the online targets that get the artifact first (at least one): "
                "10% or 10. The rest follow in waves twice as large as the one before."
            ),
        ),
    ] = "10%",
    max_failures: Annotated[
        int,
        typer.Option(
            "--max-failures",
            min=0,
            metavar="K",
            help="Failed devices tolerated; one more stops the rollout and rolls it back.",
        ),
    ] = 0,
    timeout: Annotated[
        float, timeout_opt("each wave's devices (and, with --wait, for offline ones)", le=3600)
    ] = 120.0,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Wait up to --timeout for offline targets (a last wave) instead of skipping them.",
        ),
    ] = False,
    as_json: JsonOpt = False,
    broker: BrokerOpt = None,
    fleet: FleetOpt = None,
    key_file: KeyFileOpt = None,
) -> None:
    """Roll ``artifact`` out with :func:`toolkit.rollout.rollout` (help: ``_DEPLOY_HELP``)."""
    from toolkit.fleet import artifact_tar
    from toolkit.rollout import rollout

    ids = chosen(to, every)
    share = parse_canary(canary)
    artifact_tar(artifact)  # a missing or damaged artifact is named before the broker is tried
    config = settings(ctx, broker, fleet, key_file)
    client = connect(config)
    bars = _Bars()
    try:
        result = rollout(
            client,
            artifact,
            _deploy_targets(client, config, ids),
            canary=share,
            max_failures=max_failures,
            timeout_s=timeout,
            wait=wait,
            on_progress=bars,
        )
    finally:
        bars.stop()
        client.close()
    if as_json:
        print_json(result.to_dict())
    else:
        console.print(_outcome_table(result))
        say(_summary(result))
    if not result.ok:
        _fail(str(result.error))


# -------------------------------------------------------------------------------- rollback
@app.command("rollback", help=_ROLLBACK_HELP)
@cli_command
def rollback(
    ctx: typer.Context,
    to: ToOpt = None,
    every: AllOpt = False,
    timeout: AnswerTimeoutOpt = 30.0,
    as_json: JsonOpt = False,
    broker: BrokerOpt = None,
    fleet: FleetOpt = None,
    key_file: KeyFileOpt = None,
) -> None:
    """Roll the targets back with :func:`toolkit.rollout.roll_back` (help: ``_ROLLBACK_HELP``)."""
    from toolkit.rollout import roll_back

    ids = chosen(to, every)
    config = settings(ctx, broker, fleet, key_file)
    client = connect(config)
    try:
        rows = roll_back(client, targets(client, config, ids), timeout_s=timeout)
    finally:
        client.close()
    if as_json:
        print_json(rows)
    else:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("device", "rolled back to", "error"):
            table.add_column(column, no_wrap=column != "error")
        for row in rows:
            to_what = f"[green]{literal(row['name'])} {literal(row['version'])}[/]"
            table.add_row(
                literal(row["id"]),
                to_what if row["ok"] else "[red]-[/]",
                literal(row["error"] or ""),
            )
        console.print(table)
    failed = [row["id"] for row in rows if not row["ok"]]
    if failed:
        _fail(f"{', '.join(failed)} did not roll back")


# --------------------------------------------------------------------------------- history
def _when(ts: Any) -> str:
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _ref(ref: Any) -> str:
    if not isinstance(ref, dict):
        return "none"
    return f"{ref.get('name')} {ref.get('version')}"


def _history_table(row: dict[str, Any]) -> Table:
    title = (
        f"{literal(row['id'])}: serves {literal(_ref(row['active']))}, "
        f"last good {literal(_ref(row['last_good']))}"
    )
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    for column in ("time", "event", "name", "version", "sha256"):
        table.add_column(column, no_wrap=True)
    for event in row["events"]:
        table.add_row(
            _when(event.get("ts")),
            literal(event.get("event", "")),
            literal(event.get("name", "")),
            literal(event.get("version", "")),
            literal(str(event.get("sha256", ""))[:12]),
        )
    return table


@app.command("history", help=_HISTORY_HELP)
@cli_command
def history(
    ctx: typer.Context,
    device: Annotated[
        str | None,
        typer.Argument(help="One device id; every online device when left out.", metavar="[ID]"),
    ] = None,
    timeout: AnswerTimeoutOpt = 10.0,
    as_json: JsonOpt = False,
    broker: BrokerOpt = None,
    fleet: FleetOpt = None,
    key_file: KeyFileOpt = None,
) -> None:
    """Ask devices for their ``history`` (help: ``_HISTORY_HELP``)."""
    from edge_agent.protocol import Command
    from toolkit.fleet_targets import send_all

    asked = chosen(device, everyone=device is None)
    config = settings(ctx, broker, fleet, key_file)
    client = connect(config)
    try:
        ids = targets(client, config, asked)
        results, errors = send_all(client, ids, Command.HISTORY, timeout=timeout)
        offline = sorted(d for d, s in client.devices().items() if d not in ids)
    finally:
        client.close()
    rows: list[dict[str, Any]] = []
    for d in ids:
        result = results.get(d)
        result = result if isinstance(result, dict) else {}
        events = result.get("events")
        rows.append(
            {
                "id": d,
                "active": result.get("active"),
                "last_good": result.get("last_good"),
                "events": events if isinstance(events, list) else [],
                "error": errors.get(d) if d not in results else None,
            }
        )
    if as_json:
        print_json(rows)
    else:
        for row in rows:
            if row["error"] is None:
                console.print(_history_table(row))
            else:
                say(f"{literal(row['id'])}: [red]{literal(row['error'])}[/]")
    if offline and device is None:
        err_console.print(
            f"offline, not asked: {literal(', '.join(offline))}", highlight=False, soft_wrap=True
        )
    failed = [row["id"] for row in rows if row["error"] is not None]
    if failed:
        _fail(f"{', '.join(failed)} did not answer with a history")
