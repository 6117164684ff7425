"""`bitfleet compress`: a trained float model into an int8, int4 or binary student, no data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ._common import check_out_dir, cli_command, literal, number, print_json, say

HELP = (
    "Compress a trained float model without its training data.\n\n"
    "A generator learns to produce images the teacher recognises and whose batch-norm "
    "statistics match the ones stored in the teacher (GDFQ's hand-designed generator, or "
    "AutoReCon's searched one), or a pool of inputs is optimised for those statistics "
    "(ZeroQ); the student is then distilled from the teacher on those images alone. No "
    "dataset is opened: the teacher's checkpoint holds everything needed.\n\n"
    "OUT is a checkpoint that `bitfleet eval` and `bitfleet export` take, with samples.png "
    "(generated images, one row per class) beside it.\n\n"
    "Example: bitfleet compress runs/teacher --to int4 --generator autorecon --out runs/int4"
)


@cli_command
def compress(
    teacher: Annotated[
        Path, typer.Argument(help="Checkpoint of the trained float model (a `bitfleet train` run).")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the student checkpoint and samples.png.")],
    to: Annotated[
        str, typer.Option(help="Student: bireal18 (binary), int8 or int4 (fake-quantised).")
    ] = "int8",
    generator: Annotated[
        str,
        typer.Option(
            help="Synthetic data: autorecon (searched generator), gdfq (GDFQ's generator) or "
            "zeroq (inputs optimised for the BN statistics)."
        ),
    ] = "gdfq",
    search_epochs: Annotated[
        int,
        typer.Option(min=1, help="autorecon: epochs of the generator search (50 steps each)."),
    ] = 2,
    generator_steps: Annotated[
        int, typer.Option(min=1, help="Steps to train the generator (zeroq: to fit its inputs).")
    ] = 300,
    steps: Annotated[int, typer.Option(min=1, help="Distillation steps of the student.")] = 600,
    genotype: Annotated[
        Path | None,
        typer.Option(
            help="autorecon: a found generator (another run's generator.json): no search."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=2, help="Images per step.")] = 64,
    search_batch_size: Annotated[
        int, typer.Option(min=2, help="autorecon: images per search step (all candidates run).")
    ] = 16,
    lr: Annotated[
        float | None,
        typer.Option(
            callback=number(gt=0),
            help="Student's Adam learning rate (default 1e-4 for int8/int4, 1e-3 for bireal18).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the generator, noise and student.")] = 0,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads (default: all cores).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar per phase.")] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON document.")
    ] = False,
) -> None:
    """Compress TEACHER into a student without data (the help text is :data:`HELP`)."""
    from toolkit.datafree import CompressConfig
    from toolkit.datafree import compress as run_compress

    check_out_dir(out)
    found = _read_genotype(genotype) if genotype is not None else None
    config = CompressConfig(
        teacher=str(teacher),
        to=to,
        generator=generator,
        search_epochs=search_epochs,
        generator_steps=generator_steps,
        steps=steps,
        batch_size=batch_size,
        search_batch_size=search_batch_size,
        genotype=found,
        lr=lr,
        seed=seed,
        threads=threads,
    )
    result = run_compress(config, out, progress=progress)
    if as_json:
        print_json(result.to_dict())
        return
    known = (
        f" (teacher {result.teacher_accuracy:.4f} on its test set)"
        if result.teacher_accuracy is not None
        else ""
    )
    say(
        f"{result.student} student written to {literal(out)} from {result.generator} data"
        f"{known}; generated images in {literal(out / 'samples.png')}"
    )
    say(f"measure it: bitfleet eval {literal(out)}   ship it: bitfleet export {literal(out)}")


def _read_genotype(path: Path) -> dict[str, Any]:
    """A generator genotype file as a dict; one-line errors for a missing or non-JSON file."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--genotype {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--genotype {path} is not a JSON genotype: {err}") from None
    if not isinstance(document, dict):
        raise ValueError(f"--genotype {path} must hold a JSON object with 'cells'")
    return document
