"""`bitfleet inspect`: an artifact's manifest, with every checksum verified."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import cli_command, console, human, literal, print_json


@cli_command
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory or .tar.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Show an artifact's manifest and verify the SHA-256 of every file (exit 1 if tampered)."""
    from exporters.artifact import open_artifact

    root, manifest = open_artifact(artifact)
    if as_json:
        print_json({"artifact": str(artifact), "verified": True, **manifest})
        return
    table = Table(title=literal(artifact), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    shape = "x".join(str(d) for d in manifest["input"]["shape"][1:])
    rows = [
        ("name", f"{manifest.get('name')} v{manifest.get('version')}"),
        ("format", f"{manifest['format']} ({manifest['format_version']})"),
        ("input", f"N x {shape} {manifest['input'].get('dtype', 'float32')}"),
        ("custom ops", ", ".join(manifest.get("custom_ops") or []) or "none"),
        ("float parts", str(manifest.get("float_parts", "fp32"))),
        ("labels", ", ".join(map(str, manifest.get("labels") or [])) or "-"),
        ("model", f"{manifest['spec']['name']} {manifest['spec']['args']}"),
        ("toolkit", str(manifest.get("toolkit_version"))),
        ("created", str(manifest.get("created_at"))),
    ]
    if "tflite" in manifest:  # how each binary layer runs in TFLite
        forms = manifest["tflite"].get("binary_layers") or {}
        counts = ", ".join(f"{n} {form}" for form, n in sorted(forms.items())) or "none"
        rows.append(
            ("binary layers", f"{counts} (--binary-form {manifest['tflite']['binary_form']})")
        )
    if "tensorrt" in manifest:
        engine = manifest["tensorrt"]
        rows.append(
            ("tensorrt", f"{engine.get('version')} {'+'.join(engine.get('precision', []))}")
        )
    rows += [
        (f"file {name}", f"{human(manifest['sizes'][name])}B sha256 {digest[:16]}...")
        for name, digest in manifest["files"].items()
    ]
    for key, value in rows:  # names, labels and paths are text, not rich markup
        table.add_row(literal(key), literal(value))
    console.print(table)
    console.print(f"[green]checksums verified[/] ({len(manifest['files'])} files)")
