"""`bitfleet simulate`: gossip learning (VC or plain averaging) vs FedAvg on a simulated fleet."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

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

if TYPE_CHECKING:
    from toolkit.simulate import SimulationConfig


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
    preset: Annotated[
        str | None,
        typer.Option(
            help="A named set of settings; every flag given explicitly still wins. 'paper': "
            "the vanishing-variance paper's regime: one SGD step of batch 64 per round for every "
            "method, --data dirichlet-pool:0.5, --self-weight 0.5, SGD --lr 0.01 --momentum 0.9 "
            "--no-nesterov --weight-decay 5e-4, --weight-init xavier, --fedavg-weights equal, "
            "--augment, --test-subset balanced."
        ),
    ] = None,
    nodes: Annotated[
        int | None,
        typer.Option(min=1, max=10_000, help="Number of simulated devices (default 50)."),
    ] = None,
    topology: Annotated[
        str | None,
        typer.Option(
            help="rrg:D, ring, full, star, scale-free:M, or auto: rrg:8 for 10 or more nodes, "
            "full below (on 9 nodes or fewer rrg:min(8, nodes-1) is the full graph anyway) "
            "(default auto)."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="iid, dirichlet:ALPHA or shards:K split the training set among the nodes; "
            "dirichlet-pool:ALPHA lets every node draw from all of it with its own label "
            "probabilities ~ Dir(ALPHA) (default dirichlet:0.5)."
        ),
    ] = None,
    merge: Annotated[str | None, typer.Option(help="vc, avg or fedavg (default vc).")] = None,
    model: Annotated[str | None, typer.Option(help="Registered model (default lenet5).")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset (digits is bundled) (default digits).")
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="Folder with the dataset files (not needed for digits).")
    ] = None,
    width: Annotated[
        float | None, typer.Option(callback=number(gt=0), help="ResNet width multiplier.")
    ] = None,
    stem: Annotated[str | None, typer.Option(help="ResNet stem: cifar or imagenet.")] = None,
    rounds: Annotated[
        int | None,
        typer.Option(
            min=1, help="Rounds (each node trains --local-steps SGD steps a round) (default 50)."
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(min=0, help="Seed for data split, graph, init and messages (default 0)."),
    ] = None,
    local_steps: Annotated[
        int | None, typer.Option(min=1, help="Local SGD steps per round (default 20; paper 1).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Local batch size (default 32; paper 64).")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(callback=number(gt=0), help="Local learning rate (default 0.05; paper 0.01)."),
    ] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd or adam (default sgd).")] = None,
    momentum: Annotated[
        float | None,
        typer.Option(callback=number(ge=0), help="SGD momentum (default 0; paper 0.9)."),
    ] = None,
    nesterov: Annotated[
        bool | None,
        typer.Option(
            "--nesterov/--no-nesterov",
            help="Nesterov momentum; --no-nesterov: classic momentum, the paper's "
            "(default on; paper off).",
        ),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            callback=number(ge=0), help="Weight decay of float weights (default 0; paper 5e-4)."
        ),
    ] = None,
    weight_init: Annotated[
        str | None,
        typer.Option(
            help="default (the model's own) or xavier (Xavier-uniform weights, zero biases) "
            "(default: default; paper xavier)."
        ),
    ] = None,
    self_weight: Annotated[
        float | None,
        typer.Option(
            callback=number(ge=0, lt=1),
            help="Weight of a node's own model in a merge (default 0.1; paper 0.5).",
        ),
    ] = None,
    variance: Annotated[
        str | None, typer.Option(help="VC target: others, self or conservative (default others).")
    ] = None,
    vc_rule: Annotated[
        str | None,
        typer.Option(
            help="VC rescaling rule: bitfleet (every tensor, ddof 1, eps 1e-4; DFL_torch's) or "
            "dfl2 (weights only, ddof 0, no eps; the paper's first simulator) (default bitfleet)."
        ),
    ] = None,
    peers: Annotated[
        int | None, typer.Option(min=0, help="Neighbours per push (0: all) (default 0).")
    ] = None,
    trigger: Annotated[
        str | None, typer.Option(help="Models to buffer before merging: 'all' or K (default all).")
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="independent (gossip) or common (FL) initialisation (default independent)."
        ),
    ] = None,
    drop: Annotated[
        float | None,
        typer.Option(
            callback=number(ge=0, lt=1), help="Probability a message is lost (default 0)."
        ),
    ] = None,
    churn: Annotated[
        float | None,
        typer.Option(
            callback=number(ge=0, lt=1),
            help="Probability a node is offline in a round (default 0).",
        ),
    ] = None,
    delay: Annotated[
        int | None, typer.Option(min=0, help="Rounds a message takes to arrive (default 0).")
    ] = None,
    rescale_binary: Annotated[
        bool | None,
        typer.Option(
            "--rescale-binary/--no-rescale-binary",
            help="VC also rescales binary layers' latent weights (--no-: average them only) "
            "(default on).",
        ),
    ] = None,
    codec: Annotated[
        str | None, typer.Option(help="Wire format: fp32, fp16, int8 or sign (default fp32).")
    ] = None,
    augment: Annotated[
        bool | None,
        typer.Option(
            "--augment/--no-augment",
            help="Rotate training batches up to 5 degrees and shift them up to 2 pixels "
            "(default off; paper on).",
        ),
    ] = None,
    fedavg_weights: Annotated[
        str | None,
        typer.Option(
            help="FedAvg weights each client by its shard size (samples) or equally (equal; "
            "always for dirichlet-pool) (default samples; paper equal)."
        ),
    ] = None,
    test_subset: Annotated[
        str | None,
        typer.Option(
            help="Evaluate every node on all of the test split, a fixed class-balanced subset "
            "(balanced: the largest, 430 images on digits) or balanced:N (N per class) "
            "(default all; paper balanced)."
        ),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Evaluate every node every N rounds, and after the last one; at 1000 nodes an "
            "evaluation costs about as much as a round of training (default 1). Rounds to a "
            "target are then multiples of N.",
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="loop (node by node: every setting) or batched (every node of a round at "
            "once, same results, about 2x faster on 2 cores; fp32 gossip without drop, churn, "
            "delay or peer sampling, SGD, models without batch norm) (default loop)."
        ),
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Run vc, avg, avg_common (plain gossip from a common initialisation) and fedavg "
            "on this setup.",
        ),
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
    """Simulate a fleet learning together: rounds to a target accuracy, per method.

    Defaults are in parentheses; --preset paper changes those marked 'paper'.

    Any flag you pass overrides the preset.
    """
    from toolkit.sim_report import COMPARED, summarise, write_results
    from toolkit.sim_report import compare as run_methods
    from toolkit.simulate import preset as configure

    check_out_dir(out)  # now, not after the whole simulation
    given = {
        "nodes": nodes,
        "topology": topology,
        "data": data,
        "dataset": dataset,
        "data_root": str(data_root) if data_root is not None else None,
        "model": model,
        "merge": merge,
        "rounds": rounds,
        "local_steps": local_steps,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "lr": lr,
        "momentum": momentum,
        "nesterov": nesterov,
        "weight_decay": weight_decay,
        "weight_init": weight_init,
        "self_weight": self_weight,
        "variance": variance,
        "vc_rule": vc_rule,
        "rescale_binary": rescale_binary,
        "peers": peers,
        "trigger": _trigger(trigger) if trigger is not None else None,
        "init": init,
        "drop": drop,
        "churn": churn,
        "delay": delay,
        "codec": codec,
        "augment": augment,
        "fedavg_weights": fedavg_weights,
        "test_subset": test_subset,
        "engine": engine,
        "eval_every": eval_every,
        "seed": seed,
    }
    config = configure(
        preset,
        model_args=resnet_args(stem, width),
        **{name: value for name, value in given.items() if value is not None},
    )
    methods = COMPARED if compare else (config.merge,)
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
        tasks = {m: bar.add_task(m, total=config.rounds) for m in methods}
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
    console.print(_table(config, summary))
    if summary["target_accuracy"] is not None:
        console.print(f"target accuracy {summary['target_accuracy']:.4f}")
    if summary["reference_accuracy"] is not None:
        whose = "FedAvg's final" if summary["reference"] == "fedavg" else "target / 0.9"
        console.print(f"reference accuracy ({whose}) {summary['reference_accuracy']:.4f}")
    if out is not None:
        say(f"histories, summary.json and curves.png written to {literal(out)}")


def _table(config: SimulationConfig, summary: dict[str, Any]) -> Table:
    """The table of ``bitfleet simulate``: one row per method.

    Final accuracy, rounds to the target and to fractions of the reference accuracy, area
    under the curve, bytes sent.
    """
    title = (
        f"{config.model}, {config.nodes} nodes, {config.topology}, {config.data}, "
        f"init {config.init}, seed {config.seed}"
    )
    table = Table(title=literal(title))
    columns = ("method", "final mean acc", "min", "max", "rounds to target")
    for column in (*columns, "rounds to 50/80/90/95% of ref", "AUC", "MB sent"):
        table.add_column(column, justify="right")

    def rounds(value: int | None) -> str:
        return "-" if value is None else str(value)

    for method, row in summary["methods"].items():
        table.add_row(
            literal(method),
            f"{row['final_accuracy']:.4f}",
            f"{row['final_min_accuracy']:.4f}",
            f"{row['final_max_accuracy']:.4f}",
            rounds(row["rounds_to_target"]),
            " / ".join(rounds(v) for v in row["rounds_to"].values()),
            f"{row['auc']:.4f}",
            f"{row['bytes_sent'] / 1e6:.1f}",
        )
    return table
