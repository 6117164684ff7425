"""`bitfleet demo`: a broker, a fleet of agents, a rollout and gossip learning, on this machine."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import check_out_dir, cli_command, console, err_console, literal, print_json

if TYPE_CHECKING:
    from toolkit.demo import FleetView
    from toolkit.fleet import FleetClient


@contextlib.contextmanager
def _live_table(client: FleetClient, view: FleetView) -> Iterator[Callable[[], None]]:
    """The `bitfleet fleet ls` table of the learning fleet, redrawn while it learns."""
    from rich.live import Live

    from toolkit.fleet_settings import FleetSettings

    from .fleet_cmd import _table, device_rows

    settings = FleetSettings(
        broker=view.broker,
        fleet=view.fleet,
        key_file=view.key_file,
        config=view.key_file.parent,
        sources={"broker": "bitfleet demo", "fleet": "bitfleet demo", "key_file": "bitfleet demo"},
    )

    def draw() -> Any:
        table = _table(device_rows(client), settings)
        table.caption = f"{view.merge} merging"
        return table

    with Live(draw(), console=console, auto_refresh=False, transient=False) as live:
        yield lambda: live.update(draw(), refresh=True)
    console.line()


def _summary(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"fleet mean test accuracy ({report['nodes']} nodes)")
    for column in ("merge", "start", f"after {report['rounds']} rounds", "min", "max"):
        table.add_column(column, justify="right")
    for merge, run in report["runs"].items():
        final = [d["accuracy"] for d in run["devices"]]
        table.add_row(
            literal(merge),
            f"{run['accuracy']['start']:.3f}",
            f"{run['accuracy']['end']:.3f}",
            f"{min(final):.3f}" if final else "-",
            f"{max(final):.3f}" if final else "-",
        )
    console.print(table)
    seed = report["seed_model"]
    for line in (
        f"seed model: {seed['images']} labelled digits, {seed['epochs']} epoch(s), test accuracy "
        f"{seed['accuracy']:.3f}; the whole demo took {report['seconds']:.0f} s",
        f"report: {report['report']}  plot: {report['plot']}",
    ):
        console.print(literal(line), soft_wrap=True, highlight=False)


# typer keeps the docstring's line breaks in --help: each of its lines stands alone (a list
# item, or a whole short paragraph), never a sentence broken to fit
@cli_command
def demo(
    nodes: Annotated[
        int, typer.Option(help="Devices in the fleet, each an agent process (2 to 16).")
    ] = 4,
    rounds: Annotated[int, typer.Option(help="Gossip-learning rounds every device runs.")] = 10,
    model: Annotated[
        str, typer.Option(help="Registered model to seed the fleet with (`bitfleet models`).")
    ] = "lenet5",
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Also run plain averaging (merge avg) from the same start on fresh agents.",
        ),
    ] = False,
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for the fleet key, seed model, node data and state, report and plot."
        ),
    ] = Path("runs/demo"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON document.")
    ] = False,
) -> None:
    """Run a whole fleet on this machine and watch it learn (under a minute on 2 cores).

    Its steps:
    1. start the embedded MQTT broker;
    2. train a seed model briefly on a few hundred digits, and export it;
    3. give each of NODES agents a label-skewed shard of the rest of the digits;
    4. deploy the model to them with a staged rollout;
    5. let them gossip-learn for ROUNDS rounds with variance-corrected merging;
    6. write OUT/report.json and OUT/fleet.png.

    Every process it starts is stopped at the end, also after an error or on Ctrl-C.
    """
    from toolkit.demo import DemoConfig, run_demo

    check_out_dir(out)
    config = DemoConfig(nodes=nodes, rounds=rounds, model=model, compare=compare, out=out)
    status_console = err_console if as_json else console

    def status(message: str) -> None:
        status_console.print(literal(message), soft_wrap=True, highlight=False)

    try:
        report = run_demo(
            config,
            status=status,
            watch=None if as_json else _live_table,
            progress=not as_json,
        )
    except KeyboardInterrupt:
        err_console.print("interrupted: every process the demo started has been stopped")
        raise typer.Exit(130) from None
    if as_json:
        print_json(report)
    else:
        _summary(report)
