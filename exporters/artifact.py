"""Artifacts: a directory (or a .tar of one) holding a model file and ``manifest.json``.

The manifest names the artifact, its format, the SHA-256 of every file, the input the model
takes (shape, dtype, normalisation), the labels, the network spec and the toolkit version.
Writing is atomic at the directory level: files go to a temporary sibling directory which is
renamed into place, so a crash never leaves half an artifact under the final name. Reading
verifies every checksum before anything is loaded. This module is torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bitfleet.errors import BitfleetError
from bitfleet.fsutil import atomic_write_bytes, fsync_dir, sha256_file

from .conventions import FORMATS

__all__ = [
    "ARTIFACT_FORMAT",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "write_artifact",
    "open_artifact",
    "read_manifest",
    "verify_artifact",
]

ARTIFACT_FORMAT = "bitfleet-artifact/1"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
"""The float training state an artifact may carry for on-device learning (``weights_file``)."""
KNOWN_FORMATS = FORMATS  # the formats the writer produces, named once in exporters.conventions


class ArtifactError(BitfleetError, ValueError):
    """An artifact that is missing, damaged, tampered with, or of an unknown format."""


def write_artifact(
    out_dir: str | os.PathLike[str],
    files: dict[str, bytes],
    manifest: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``files`` and a manifest (checksums added) as the directory ``out_dir``, atomically."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        document = dict(manifest)
        document["format_version"] = ARTIFACT_FORMAT
        document.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        document["files"] = {name: sha256_file(tmp / name) for name in sorted(files)}
        document["sizes"] = {name: len(data) for name, data in sorted(files.items())}
        atomic_write_bytes(
            tmp / MANIFEST_FILE, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
        )
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and validate ``manifest.json`` (format version, required keys); no checksums."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{Path(directory)} has no {MANIFEST_FILE}: not a bitfleet artifact")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); re-export the artifact") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    version = manifest.get("format_version")
    if version != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{path} has format version {version!r}; this bitfleet reads {ARTIFACT_FORMAT!r} "
            "(upgrade bitfleet, or re-export the artifact with this version)"
        )
    for key in ("format", "files", "model_file", "input"):
        if key not in manifest:
            raise ArtifactError(f"{path} lacks the required key {key!r}; re-export the artifact")
    if manifest["format"] not in KNOWN_FORMATS:
        raise ArtifactError(
            f"{path} declares format {manifest['format']!r}; known: {', '.join(KNOWN_FORMATS)}"
        )
    return manifest


def verify_artifact(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate the manifest and the SHA-256 of every file it lists; return the manifest."""
    root = Path(directory)
    manifest = read_manifest(root)
    for name, expected in manifest["files"].items():
        file = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"manifest names a file outside the artifact: {name!r}")
        if not file.is_file():
            raise ArtifactError(f"artifact {root} is missing {name}, which its manifest lists")
        if sha256_file(file) != expected:
            raise ArtifactError(
                f"{file} does not match the SHA-256 in {MANIFEST_FILE}: the artifact was "
                "modified or damaged; re-export or re-download it"
            )
    if manifest["model_file"] not in manifest["files"]:
        raise ArtifactError(f"manifest's model_file {manifest['model_file']!r} is not in its files")
    return manifest


def open_artifact(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """Resolve an artifact directory or .tar and verify it; return (directory, manifest).

    A .tar is extracted into a private temporary directory (members that would land outside
    it are refused) which lives as long as the process.
    """
    source = Path(path)
    if not source.exists():
        raise ArtifactError(f"artifact {source} does not exist")
    if source.is_file():
        if not tarfile.is_tarfile(source):
            raise ArtifactError(f"{source} is neither an artifact directory nor a .tar of one")
        target = Path(tempfile.mkdtemp(prefix="bitfleet-artifact-"))
        with tarfile.open(source) as archive:
            archive.extractall(target, filter="data")
        entries = [p for p in target.iterdir()]
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else target
        return root, verify_artifact(root)
    return source, verify_artifact(source)
