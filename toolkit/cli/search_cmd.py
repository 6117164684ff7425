"""`bitfleet search`: differentiable search of a binary cell toward a target cost in OPs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from ._common import check_out_dir, cli_command, human, literal, number, print_json, say

_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9}


def parse_ops(text: str) -> float:
    """``1.6e8``, ``160000000``, ``160M`` or ``0.16G`` -> OPs; a ValueError naming the flag."""
    raw = text.strip()
    scale = _SUFFIXES.get(raw[-1:].lower(), 1.0) if raw else 1.0
    number_part = raw[:-1] if scale != 1.0 else raw
    try:
        value = float(number_part) * scale
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"--target-ops must be a positive number of OPs such as 1.6e8 or 160M, got {text!r}"
        )
    return value


HELP = (
    "Search a binary cell (DARTS, first order) whose network costs about --target-ops.\n\n"
    "Half the training images train the supernet's binary weights, the other half its "
    "architecture weights together with a penalty on the distance to the target cost. The "
    'derived genotype builds with `models.create("nasb", genotype=...)` and trains with '
    "`bitfleet train --model nasb --genotype OUT/genotype.json`.\n\n"
    "Example: bitfleet search --dataset digits-hard --target-ops 1.7e8 --epochs 10 --out runs/s"
)


@cli_command
def search(
    target_ops: Annotated[
        str,
        typer.Option(
            help="Cost to steer toward, in OPs (FLOPs + BOPs/64) at 224x224: 1.6e8 or 160M. "
            "Out of the space's reach is an error before any training.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(help="Folder for genotype.json, alphas.png, search.json and checkpoints."),
    ],
    space: Annotated[str, typer.Option(help="Search space: nasb.")] = "nasb",
    dataset: Annotated[
        str, typer.Option(help="digits-hard (default), digits, cifar10, mnist or imagefolder.")
    ] = "digits-hard",
    data_root: Annotated[
        Path | None, typer.Option(help="Folder with the dataset files (not for the digits sets).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Search epochs.")] = 10,
    cells: Annotated[int, typer.Option(min=1, help="Cells in the supernet (and the net).")] = 8,
    channels: Annotated[int, typer.Option(min=2, help="Channels of the first cells.")] = 20,
    stem: Annotated[str, typer.Option(help="cifar or imagenet (conv7x7/2 + pool/2).")] = (
        "imagenet"
    ),
    ops: Annotated[
        str | None,
        typer.Option(
            help="Candidate operations, comma-separated (default: all of models.nasb.PRIMITIVES)."
        ),
    ] = None,
    lam: Annotated[
        float,
        typer.Option(
            "--lambda", callback=number(ge=0), help="Weight of the OPs penalty (0: no penalty)."
        ),
    ] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size of both halves.")] = 64,
    optimizer: Annotated[str, typer.Option(help="Weights' optimizer: adam or sgd.")] = "adam",
    lr: Annotated[float, typer.Option(callback=number(gt=0), help="Weights' peak lr.")] = 1e-3,
    arch_lr: Annotated[
        float, typer.Option(callback=number(gt=0), help="Alphas' Adam learning rate.")
    ] = 3e-4,
    warmup_epochs: Annotated[
        int,
        typer.Option(
            min=0,
            help="First epochs train only the weights, the alphas frozen (below --epochs).",
        ),
    ] = 0,
    limit: Annotated[
        int | None, typer.Option(min=2, help="Use only this many training images (split 50/50).")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the split, init and batches.")] = 0,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads (default: all cores).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the search in --out from its checkpoint.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar per epoch.")] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON document.")
    ] = False,
) -> None:
    """Search a binary cell toward --target-ops (the help text is :data:`HELP`)."""
    from models.nasb import PRIMITIVES
    from models.nasb.network import DEFAULT_CHANNELS, DEFAULT_LAYERS
    from toolkit.search import SearchConfig
    from toolkit.search import search as run_search

    check_out_dir(out)
    target = parse_ops(target_ops)
    candidates = [name.strip() for name in ops.split(",")] if ops else list(PRIMITIVES)
    config = SearchConfig(
        space=space,
        dataset=dataset,
        data_root=str(data_root) if data_root else None,
        target_ops=target,
        lam=lam,
        epochs=epochs,
        cells=cells,
        channels=channels,
        stem=stem,
        primitives=candidates,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        arch_lr=arch_lr,
        warmup_epochs=warmup_epochs,
        limit=limit,
        seed=seed,
        threads=threads,
    )
    result = run_search(config, out, resume=resume, progress=progress)
    if as_json:
        print_json(result.to_dict())
        return
    say(
        f"genotype written to {literal(out / 'genotype.json')} (alphas.png beside it): the "
        f"network costs {human(result.ops)} OPs at 224x224, target {human(target)}"
    )
    network = result.network
    if network["layers"] == DEFAULT_LAYERS:
        width = network["channels"] / DEFAULT_CHANNELS
        say(
            f"train it: bitfleet train --model nasb --genotype {literal(out / 'genotype.json')} "
            f"--dataset {literal(dataset)} --stem {network['stem']}"
            + (f" --width {width:g}" if width != 1 else "")
        )
    else:
        args = ", ".join(f"{k}={v}" for k, v in network.items())
        say(f"build it with models.create('nasb', genotype=..., {literal(args)})")
