"""Serving: load an artifact, health-check it, swap it in; run inference on what arrives.

:class:`ModelServer` holds the model a device serves. :meth:`ModelServer.serve` is the one path
by which a model starts serving: load the installed artifact with :func:`exporters.runtime.load`,
run a probe batch through it (finite logits of the right shape, else :class:`ArtifactError`),
record it in the state directory if asked, and only then swap it in; the model that served
before keeps serving whenever any step fails. Start-up (:meth:`ModelServer.start`), ``deploy``
and ``rollback`` (:meth:`ModelServer.rollback`) all go through it.

:meth:`ModelServer.infer` decodes a JSON batch (:func:`edge_agent.protocol.decode_inputs`) and
returns logits, top-1 classes and the latency, which it also records for telemetry. It is the
one check both inference paths (MQTT and the local HTTP port) go through: a batch holding NaN
or Inf is refused (drop reason :data:`BAD_INPUT`), and so are non-finite logits from the model
(:data:`BAD_OUTPUT`), each with an :class:`InferenceError` whose message is the error reply, so
no reply ever carries a number JSON cannot hold. Imports no torch.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file as safetensors_load

from bitfleet.errors import BitfleetError
from edge_agent.config import AgentConfig
from edge_agent.protocol import BAD_INPUT, BAD_OUTPUT, DropCounter, decode_inputs
from edge_agent.state import ArtifactRef, StateStore
from exporters import runtime
from exporters.artifact import ArtifactError

__all__ = ["InferenceError", "ModelServer", "LATENCY_WINDOW"]

log = logging.getLogger("bitfleet.agent")

LATENCY_WINDOW = 1000
"""How many recent inference latencies telemetry summarises."""

_PROBE_BATCH = 2


class InferenceError(BitfleetError, ValueError):
    """An inference request that cannot be answered: no model yet, or a batch that does not fit."""


class ModelServer:
    """The model a device serves, and the one path that replaces it.

    Args:
        config: the agent's settings (``threads`` is read at every load, so ``config.set``
            applies to the next model).
        store: the state directory, whose ``active`` and ``last_good`` pointers it keeps.
        drops: where refused inference requests are counted, by reason (:data:`BAD_INPUT`,
            :data:`BAD_OUTPUT`); a private counter when omitted.
    """

    def __init__(
        self, config: AgentConfig, store: StateStore, drops: DropCounter | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.drops = drops if drops is not None else DropCounter()
        self._lock = threading.Lock()
        self._predictor: runtime.Predictor | None = None
        self._artifact: ArtifactRef | None = None
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)

    @property
    def predictor(self) -> runtime.Predictor | None:
        """The loaded model, or ``None`` before the first deploy."""
        return self._predictor

    @property
    def artifact(self) -> ArtifactRef | None:
        """The artifact being served, or ``None`` before the first deploy."""
        return self._artifact

    # ------------------------------------------------------------------------- load and serve
    def serve(
        self,
        ref: ArtifactRef,
        record: Callable[[], object] | None = None,
        label: str | None = None,
    ) -> None:
        """Load ``ref``, health-check it, run ``record`` (a state update), then swap it in.

        Raises :class:`ArtifactError` (or the error of ``record``) and leaves the serving model
        untouched when any step fails. ``label`` is how that error names the artifact (the path
        the user gave, say) instead of its slot in the state directory.
        """
        try:
            predictor = runtime.load(ref.path, threads=self.config.threads)
            _health_check(predictor)
        except ArtifactError as err:
            if label is None:
                raise
            raise ArtifactError(_named(str(err), ref.path, label)) from None
        if record is not None:
            record()
        with self._lock:
            self._predictor, self._artifact = predictor, ref
        log.info("serving %s %s (%s)", ref.name, ref.version, ref.path.name)

    def start(self, initial: str | None) -> None:
        """Serve the state directory's active artifact; without one, install ``initial``."""
        ref = self.store.active()
        if ref is not None:
            self.serve(ref)
        elif initial:
            installed = self.store.install(initial)
            self.serve(
                installed,
                record=lambda: self.store.activate(installed, event="initial"),
                label=initial,
            )

    def activate(self, ref: ArtifactRef) -> None:
        """Serve a freshly installed artifact; the one serving before becomes last-good."""
        self.serve(ref, record=lambda: self.store.activate(ref), label=f"{ref.name} {ref.version}")

    def rollback(self) -> ArtifactRef:
        """Serve the last-good artifact again; the one serving now becomes last-good.

        Raises :class:`~edge_agent.state.StateError` when there is none, and
        :class:`ArtifactError` (swapping the pointers back) when it no longer loads.
        """
        previous = self.store.rollback()
        try:
            self.serve(previous)
        except ArtifactError as err:
            self.store.rollback()  # swap back: keep serving what served
            raise ArtifactError(
                f"the last-good artifact does not load ({err}); kept the current"
            ) from None
        self.store.record("rollback", previous)
        return previous

    def spec(self) -> dict[str, Any] | None:
        """The network spec in the served artifact's manifest (needed to learn), if any."""
        ref = self._artifact
        return _manifest_spec(ref.path) if ref is not None else None

    def learning_start(self) -> tuple[str, dict[str, np.ndarray] | None] | None:
        """Where on-device learning of the served model starts: its digest and float weights.

        The weights are the artifact's ``weights_file`` (exported with ``weights=True``;
        verified with the rest at install), or ``None`` when it carries none. ``None`` overall
        before the first deploy.
        """
        ref = self._artifact
        if ref is None:
            return None
        name = _manifest(ref.path).get("weights_file")
        if not isinstance(name, str) or not name:
            return ref.sha256, None
        path = ref.path / Path(name).name
        try:
            return ref.sha256, dict(safetensors_load(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises several types
            raise ArtifactError(
                f"the weights of {ref.name} {ref.version} ({path.name}) are unreadable: {err}"
            ) from None

    def model_card(self) -> dict[str, Any] | None:
        """What a client needs to prepare inputs: the manifest's ``input`` and ``labels``."""
        ref = self._artifact
        if ref is None:
            return None
        manifest = _manifest(ref.path)
        return {"input": manifest.get("input"), "labels": manifest.get("labels")}

    # ------------------------------------------------------------------------------ inference
    def infer(self, inputs: Any) -> dict[str, Any]:
        """Logits and top-1 class for a JSON batch; :class:`InferenceError` (one line) if bad.

        A batch with NaN or Inf, and a model that answers with non-finite logits, are refused
        and counted in ``drops``.
        """
        batch = decode_inputs(inputs)
        with self._lock:
            predictor, ref = self._predictor, self._artifact
        if predictor is None:
            raise InferenceError("no model is deployed on this device yet; send a deploy command")
        bad = _first_non_finite(batch)
        if bad is not None:
            self.drops.count(BAD_INPUT)
            raise InferenceError(
                f"inputs hold NaN or Inf (the first at index {bad}); send finite numbers"
            )
        start = time.perf_counter()
        try:
            logits = predictor.predict(batch)
        except ValueError as err:  # the runtime's check of the batch's shape and dtype
            raise InferenceError(str(err)) from None
        elapsed = (time.perf_counter() - start) * 1000.0
        bad = _first_non_finite(logits)
        if bad is not None:
            self.drops.count(BAD_OUTPUT)
            raise InferenceError(
                f"the model returned non-finite logits (the first at index {bad}) for this "
                "batch: its inputs are probably far outside the range the model was trained on"
            )
        self.latencies.append(elapsed)
        return {
            "logits": logits.tolist(),
            "top1": logits.argmax(1).tolist(),
            "latency_ms": elapsed,
            "model": ref.name if ref else None,
            "version": ref.version if ref else None,
        }


def _first_non_finite(array: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first NaN or Inf in a numeric array, or ``None`` when all are finite."""
    finite = np.isfinite(array)
    if bool(finite.all()):
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), finite.shape))


def _health_check(predictor: runtime.Predictor) -> None:
    probe = np.zeros((_PROBE_BATCH, *predictor.input_shape), np.float32)
    logits = predictor.predict(probe)
    finite = bool(np.all(np.isfinite(logits)))
    if logits.ndim != 2 or logits.shape[0] != _PROBE_BATCH or not finite:
        raise ArtifactError(
            f"health check failed: the model returned {logits.shape} "
            f"{'' if finite else 'non-finite '}logits on a probe batch"
        )


def _named(message: str, slot: Path, label: str) -> str:
    """``message`` naming the artifact as ``label`` rather than by its ``slot`` directory."""
    message = message.replace(str(slot), label)
    return message if label in message else f"artifact {label}: {message}"


def _manifest(path: Path) -> dict[str, Any]:
    """The installed artifact's manifest (verified at install; empty if it cannot be read)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _manifest_spec(path: Path) -> dict[str, Any] | None:
    spec = _manifest(path).get("spec")
    return spec if isinstance(spec, dict) else None
