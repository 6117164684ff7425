"""The agent's state directory: what survives a restart, a crash or a power cut.

One directory (``--state-dir``, ``/var/lib/bitfleet`` under systemd) holds everything the agent
must not lose::

    artifacts/<slot>/            installed artifacts (verified copies; slot = name-version-sha8)
    active.json                  which slot serves now
    last_good.json               the slot that served before it (the rollback target)
    history.json                 the latest deploys and rollbacks (``history`` command)
    config.json                  settings changed at run time with the ``config.set`` command
    counters.json                drop counters and other totals, carried across restarts
    learning/checkpoint.safetensors, learning/meta.json
                                 the on-device learner's model and its round, settings, metrics

Every file is written atomically (temp file, fsync, rename: :mod:`bitfleet.fsutil`), and an
artifact is installed into a temporary sibling directory that is renamed into place only after
its checksums verify, so after SIGKILL or power loss the directory holds either the old state or
the new one. Pointers (``active.json``) are written last: a crash between installing and
activating leaves the old model serving. Torch-free, like the rest of the serving path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file as _st_load_file
from safetensors.numpy import save as _st_save

from bitfleet.errors import BitfleetError
from bitfleet.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir
from exporters.artifact import ArtifactError, verify_artifact

__all__ = ["HISTORY_EVENTS", "StateStore", "ArtifactRef", "StateError"]

log = logging.getLogger("bitfleet.agent")

HISTORY_EVENTS = ("initial", "deploy", "rollback")
"""What ``history.json`` records: the first model at start-up, a deploy, a rollback."""
_HISTORY_LIMIT = 100  # events kept: enough to see a device's recent versions


class StateError(BitfleetError, RuntimeError):
    """The state directory is unusable (not writable, or a pointer names a missing artifact)."""


@dataclass(frozen=True)
class ArtifactRef:
    """An installed artifact: its slot directory and the identity from its manifest."""

    path: Path
    name: str
    version: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {
            "slot": self.path.name,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
        }


def _manifest_digest(directory: Path) -> str:
    """A stable identity for an artifact: the SHA-256 of its manifest (which lists every file's)."""
    import hashlib

    return hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()


class StateStore:
    """Read and write the agent's state directory (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        try:
            (self.root / "artifacts").mkdir(parents=True, exist_ok=True)
            (self.root / "learning").mkdir(exist_ok=True)
        except OSError as err:
            raise StateError(
                f"cannot use state directory {self.root}: {err.strerror}; pass --state-dir "
                "with a directory this user may write"
            ) from None
        self._clean_leftovers()

    # ----------------------------------------------------------------------------- artifacts
    def install(self, source: str | os.PathLike[str], label: str | None = None) -> ArtifactRef:
        """Copy an artifact (directory or .tar) into the store, verified; return its slot.

        Installing the same artifact twice returns the existing slot. Raises ArtifactError for
        a damaged, tampered or unreadable artifact, naming it as ``label`` (default: ``source``),
        never by the temporary copy it checked; nothing is left behind then.
        """
        source = Path(source)
        label = label or str(source)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=self.root / "artifacts"))
        except OSError as err:
            raise StateError(
                f"cannot install artifacts in {self.root / 'artifacts'}: {err.strerror or err}"
            ) from None
        try:
            staged, manifest = _stage(source, tmp / "x", label)
            digest = _manifest_digest(staged)
            name = str(manifest.get("name") or "model")
            version = str(manifest.get("version") or "0")
            slot = self.root / "artifacts" / _slot_name(name, version, digest)
            if not slot.exists():
                for file in staged.rglob("*"):
                    if file.is_file():
                        with open(file, "rb") as handle:
                            os.fsync(handle.fileno())
                os.replace(staged, slot)
                fsync_dir(slot.parent)
            return ArtifactRef(slot, name, version, digest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def activate(self, ref: ArtifactRef, event: str = "deploy") -> None:
        """Make ``ref`` the served artifact; the one serving before becomes last-good.

        ``event`` (one of :data:`HISTORY_EVENTS`) is what :meth:`history` records.
        """
        current, displaced = self.active(), self.last_good()
        if current is not None and current.path != ref.path:
            atomic_write_json(self.root / "last_good.json", current.to_dict())
        atomic_write_json(self.root / "active.json", {**ref.to_dict(), "activated_at": time.time()})
        self.record(event, ref)
        if displaced is not None:
            self._collect_garbage(displaced)

    def rollback(self) -> ArtifactRef:
        """Swap active and last-good; raise StateError when there is nothing to roll back to."""
        previous = self.last_good()
        current = self.active()
        if previous is None:
            raise StateError("no last-good artifact to roll back to (only one was ever deployed)")
        if current is not None:
            atomic_write_json(self.root / "last_good.json", current.to_dict())
        atomic_write_json(
            self.root / "active.json", {**previous.to_dict(), "activated_at": time.time()}
        )
        return previous

    def history(self) -> list[dict[str, Any]]:
        """The latest deploys and rollbacks, oldest first: ``{ts, event, name, version, sha256}``.

        Written after the pointers, so a crash between the two loses an event, never a model.
        An unreadable history (a damaged disk, an edit by hand) reads as empty, with a warning,
        and is replaced by the next event: it must never stop a deploy.
        """
        try:
            events = self._read_json("history.json") or []
        except StateError as err:
            log.warning("%s", err)
            return []
        return [e for e in events if isinstance(e, dict)] if isinstance(events, list) else []

    def record(self, event: str, ref: ArtifactRef) -> None:
        """Append ``event`` (one of :data:`HISTORY_EVENTS`) for ``ref`` to the history.

        :meth:`activate` records its own; a rollback is recorded by its caller once the
        artifact it returns to serves again (:meth:`rollback` may be undone).
        """
        if event not in HISTORY_EVENTS:
            raise ValueError(f"history event must be one of {HISTORY_EVENTS}, not {event!r}")
        entry = {"ts": time.time(), "event": event, "name": ref.name, "version": ref.version}
        events = [*self.history(), {**entry, "sha256": ref.sha256}][-_HISTORY_LIMIT:]
        atomic_write_json(self.root / "history.json", events)

    def active(self) -> ArtifactRef | None:
        """The artifact to serve, or None when nothing was deployed yet."""
        return self._pointer("active.json")

    def last_good(self) -> ArtifactRef | None:
        """The artifact that served before the active one, if any."""
        return self._pointer("last_good.json")

    def _pointer(self, name: str) -> ArtifactRef | None:
        data = self._read_json(name)
        if not data:
            return None
        slot = self.root / "artifacts" / str(data.get("slot", ""))
        if not data.get("slot") or not slot.is_dir():
            raise StateError(
                f"{self.root / name} names artifact slot {data.get('slot')!r}, which is missing; "
                "deploy the model again"
            )
        return ArtifactRef(slot, str(data["name"]), str(data["version"]), str(data["sha256"]))

    def _collect_garbage(self, displaced: ArtifactRef) -> None:
        """Delete the slot that just lost its last-good role (installed-but-pending slots stay)."""
        keep = {ref.path for ref in (self.active(), self.last_good()) if ref is not None}
        if displaced.path not in keep:
            shutil.rmtree(displaced.path, ignore_errors=True)

    def _clean_leftovers(self) -> None:
        """Remove half-installed artifacts a crash left behind (never-renamed temp dirs)."""
        for entry in (self.root / "artifacts").glob(".install-*"):
            shutil.rmtree(entry, ignore_errors=True)

    # ------------------------------------------------------------------- config and counters
    def config_overrides(self) -> dict[str, Any]:
        """Settings changed at run time (``config.set``), applied over the config file."""
        return self._read_json("config.json") or {}

    def save_config_overrides(self, values: Mapping[str, Any]) -> None:
        atomic_write_json(self.root / "config.json", dict(values))

    def counters(self) -> dict[str, int]:
        data = self._read_json("counters.json") or {}
        return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}

    def save_counters(self, counters: Mapping[str, int]) -> None:
        atomic_write_json(self.root / "counters.json", {k: int(v) for k, v in counters.items()})

    # ------------------------------------------------------------------------------ learning
    def save_checkpoint(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Write the learner's model and metadata; the metadata goes last, naming the model.

        The model file is written under a new name and ``meta.json`` (written atomically after
        it) points at it, so a crash between the two leaves the previous pair intact.
        """
        folder = self.root / "learning"
        name = f"checkpoint-{int(meta.get('round', 0))}.safetensors"
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        atomic_write_bytes(folder / name, _st_save(arrays))
        atomic_write_json(folder / "meta.json", {**dict(meta), "file": name})
        for old in folder.glob("checkpoint-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load_checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The last complete checkpoint (model, metadata), or None if there is none."""
        meta = self._read_json("learning/meta.json")
        if not meta or "file" not in meta:
            return None
        path = self.root / "learning" / Path(str(meta["file"])).name
        if not path.is_file():
            return None
        try:
            return dict(_st_load_file(path)), meta
        except Exception as err:  # noqa: BLE001 - safetensors raises several types
            raise StateError(
                f"learning checkpoint {path} is unreadable ({err}); delete it to start over"
            ) from None

    def _read_json(self, name: str) -> Any:
        path = self.root / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StateError(
                f"{path} is unreadable ({err}); remove it to reset that state"
            ) from None


def _stage(source: Path, target: Path, label: str) -> tuple[Path, dict[str, Any]]:
    """Copy or extract the artifact at ``source`` into ``target`` and verify it there.

    Returns the verified copy's root and its manifest. Raises ArtifactError naming the artifact
    as ``label`` for one that is missing, unreadable, damaged or tampered with.
    """
    staged = target
    try:
        if source.is_file():
            if not tarfile.is_tarfile(source):
                raise ArtifactError(f"{label} is neither an artifact directory nor a .tar")
            with tarfile.open(source) as archive:
                archive.extractall(target, filter="data")
            entries = list(target.iterdir())
            staged = entries[0] if len(entries) == 1 and entries[0].is_dir() else target
        elif source.is_dir():
            shutil.copytree(source, target)
        else:
            raise ArtifactError(f"artifact {label} does not exist")
        return staged, verify_artifact(staged)
    except ArtifactError as err:
        raise ArtifactError(_renamed(str(err), staged, label)) from None
    except (OSError, tarfile.TarError) as err:
        why = getattr(err, "strerror", None) or err
        raise ArtifactError(
            f"cannot read artifact {label}: {_renamed(str(why), staged, label)}"
        ) from None


def _renamed(message: str, staged: Path, label: str) -> str:
    """``message`` with the temporary copy ``staged`` called ``label``, the name the user knows.

    ``<staged>/model.onnx does not match ...`` becomes ``<label>: model.onnx does not match ...``.
    """
    message = message.replace(f"{staged}{os.sep}", f"{label}: ").replace(str(staged), label)
    return message


def _slot_name(name: str, version: str, digest: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{name}-{version}")
    return f"{safe[:80]}-{digest[:8]}"
