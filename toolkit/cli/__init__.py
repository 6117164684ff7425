"""The ``bitfleet`` command: one typer app, one module per command (as Flower's CLI)."""

from __future__ import annotations

from typing import Annotated

import typer

from . import (
    _fleet,
    bench_cmd,
    broker_cmd,
    compress_cmd,
    demo_cmd,
    eval_cmd,
    export_cmd,
    fleet_cmd,  # noqa: F401  (each fleet_*_cmd module registers on _fleet.app)
    fleet_deploy_cmd,  # noqa: F401
    fleet_device_cmd,  # noqa: F401
    fleet_keys_cmd,  # noqa: F401
    fleet_learn_cmd,  # noqa: F401
    info_cmd,
    inspect_cmd,
    models_cmd,
    ops_cmd,
    search_cmd,
    simulate_cmd,
    train_cmd,
)
from ._common import set_debug

app = typer.Typer(
    name="bitfleet",
    help=(
        "Train binary neural networks, export them for edge devices, and run a fleet that keeps "
        "learning together.\n\nStart with `bitfleet demo` (a whole fleet on this machine), "
        "then `bitfleet models` and `bitfleet train --model bireal18 --dataset digits --epochs 8 "
        "--out runs/bireal`; `bitfleet fleet --help` drives real devices."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")
    ] = False,
) -> None:
    set_debug(debug)


app.command("demo")(demo_cmd.demo)
app.command("models")(models_cmd.list_models_cmd)
app.command("ops")(ops_cmd.ops)
app.command("train")(train_cmd.train)
app.command("eval")(eval_cmd.eval_checkpoint)
app.command("info")(info_cmd.info)
app.command("export")(export_cmd.export)
app.command("inspect")(inspect_cmd.inspect)
app.command("bench")(bench_cmd.bench)
app.command("simulate")(simulate_cmd.simulate)
app.command("search", help=search_cmd.HELP)(search_cmd.search)
app.command("compress", help=compress_cmd.HELP)(compress_cmd.compress)
app.add_typer(_fleet.app, name="fleet")
app.command("broker")(broker_cmd.broker)


def main() -> None:
    """Console-script entry point."""
    app()
