"""`bitfleet simulate`: gossip learning (VC or plain averaging) vs FedAvg on a simulated fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from ._common import (
    check_out_dir,
    cli_command,
    console,
    err_console,
    literal,
    number,
    print_json,
    resnet_args,
    say,
)


def _trigger(text: str) -> int | Literal["all"]:
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--trigger must be 'all' or a positive integer, got {text!r}")
    return value


@cli_command
def simulate(
    nodes: Annotated[
        int, typer.Option(min=1, max=10_000, help="Number of simulated devices.")
    ] = 50,
    topology: Annotated[
        str,
        typer.Option(
            help="rrg:D, ring, full, star, scale-free:M, or auto: rrg:8 for 10 or more nodes, "
            "full below (on 9 nodes or fewer rrg:min(8, nodes-1) is the full graph anyway)."
        ),
    ] = "auto",
    data: Annotated[
        str,
        typer.Option(
            help="iid, dirichlet:ALPHA or shards:K split the training set among the nodes; "
            "dirichlet-pool:ALPHA lets every node draw from all of it with its own label "
            "probabilities ~ Dir(ALPHA)."
        ),
    ] = "dirichlet:0.5",
    merge: Annotated[str, typer.Option(help="vc, avg or fedavg.")] = "vc",
    model: Annotated[str, typer.Option(help="Registered model.")] = "lenet5",
    dataset: Annotated[str, typer.Option(help="Dataset (digits is bundled).")] = "digits",
    data_root: Annotated[
        Path | None, typer.Option(help="Folder with the dataset files (not needed for digits).")
    ] = None,
    width: Annotated[
        float | None, typer.Option(callback=number(gt=0), help="ResNet width multiplier.")
    ] = None,
    stem: Annotated[str | None, typer.Option(help="ResNet stem: cifar or imagenet.")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Communication rounds.")] = 50,
    seed: Annotated[
        int, typer.Option(min=0, help="Seed for data split, graph, init and messages.")
    ] = 0,
    local_steps: Annotated[int, typer.Option(min=1, help="Local SGD steps per round.")] = 20,
    batch_size: Annotated[int, typer.Option(min=1, help="Local batch size.")] = 32,
    lr: Annotated[float, typer.Option(callback=number(gt=0), help="Local learning rate.")] = 0.05,
    optimizer: Annotated[str, typer.Option(help="sgd or adam.")] = "sgd",
    self_weight: Annotated[
        float,
        typer.Option(callback=number(ge=0, lt=1), help="Weight of a node's own model in a merge."),
    ] = 0.1,
    variance: Annotated[
        str, typer.Option(help="VC target: others, self or conservative.")
    ] = "others",
    peers: Annotated[int, typer.Option(min=0, help="Neighbours per push (0: all).")] = 0,
    trigger: Annotated[
        str, typer.Option(help="Models to buffer before merging: 'all' or K.")
    ] = "all",
    init: Annotated[
        str, typer.Option(help="independent (gossip) or common (FL) initialisation.")
    ] = "independent",
    drop: Annotated[
        float, typer.Option(callback=number(ge=0, lt=1), help="Probability a message is lost.")
    ] = 0.0,
    churn: Annotated[
        float,
        typer.Option(callback=number(ge=0, lt=1), help="Probability a node is offline in a round."),
    ] = 0.0,
    delay: Annotated[int, typer.Option(min=0, help="Rounds a message takes to arrive.")] = 0,
    rescale_binary: Annotated[
        bool,
        typer.Option(
            "--rescale-binary/--no-rescale-binary",
            help="VC also rescales binary layers' latent weights (--no-: average them only).",
        ),
    ] = True,
    codec: Annotated[str, typer.Option(help="Wire format: fp32, fp16, int8 or sign.")] = "fp32",
    augment: Annotated[
        bool,
        typer.Option(
            "--augment/--no-augment",
            help="Rotate training batches up to 5 degrees and shift them up to 2 pixels.",
        ),
    ] = False,
    compare: Annotated[
        bool, typer.Option("--compare", help="Run vc, avg and fedavg on this setup.")
    ] = False,
    target: Annotated[
        float | None,
        typer.Option(
            callback=number(ge=0, le=1), help="Target accuracy (default: 90% of FedAvg's final)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Directory for histories, summary and plot.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Parallel simulations (default: cores).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Simulate a fleet learning together: rounds to a target accuracy, per method."""
    from toolkit.sim_report import compare as run_methods
    from toolkit.sim_report import summarise, write_results
    from toolkit.simulate import SimulationConfig

    check_out_dir(out)  # now, not after the whole simulation
    config = SimulationConfig(
        model_args=resnet_args(stem, width),
        nodes=nodes,
        topology=topology,
        data=data,
        dataset=dataset,
        data_root=str(data_root) if data_root is not None else None,
        model=model,
        merge=merge,
        rounds=rounds,
        local_steps=local_steps,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        self_weight=self_weight,
        variance=variance,
        rescale_binary=rescale_binary,
        peers=peers,
        trigger=_trigger(trigger),
        init=init,
        drop=drop,
        churn=churn,
        delay=delay,
        codec=codec,
        augment=augment,
        seed=seed,
    )
    methods = ("vc", "avg", "fedavg") if compare else (merge,)
    show = progress and not as_json
    if show:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err_console,
        )
        tasks = {m: bar.add_task(m, total=rounds) for m in methods}
        with bar:
            try:
                results = run_methods(
                    config,
                    methods,
                    workers=workers,
                    on_round=lambda m, r: bar.update(tasks[m], completed=r),
                )
            except BaseException:
                bar.live.transient = True  # erase the bar: the error line stands alone
                raise
    else:
        results = run_methods(config, methods, workers=workers)
    summary = summarise(results, target)
    if out is not None:
        write_results(out, results, summary)
    if as_json:
        print_json(summary)
        return
    title = f"{model}, {nodes} nodes, {config.topology}, {data}, init {init}, seed {seed}"
    table = Table(title=literal(title))
    for column in ("method", "final mean acc", "min", "max", "rounds to target", "MB sent"):
        table.add_column(column, justify="right")
    for method, row in summary["methods"].items():
        reached = row["rounds_to_target"]
        table.add_row(
            literal(method),
            f"{row['final_accuracy']:.4f}",
            f"{row['final_min_accuracy']:.4f}",
            f"{row['final_max_accuracy']:.4f}",
            "-" if reached is None else str(reached),
            f"{row['bytes_sent'] / 1e6:.1f}",
        )
    console.print(table)
    if summary["target_accuracy"] is not None:
        console.print(f"target accuracy {summary['target_accuracy']:.4f}")
    if out is not None:
        say(f"histories, summary.json and curves.png written to {literal(out)}")
