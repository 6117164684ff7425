"""On-device gossip learning, as the agent runs it: the loop thread, pushes, gossip receipt.

:class:`LearningLoop` builds a :class:`edge_agent.learner.Learner` when learning starts (that
import brings torch; a device that only serves never pays for it) and runs rounds on its own
thread: train locally, push the model to peers chosen among the online learning ones (signed
``"gossip"`` frames, chunked, flow-controlled), wait ``round_interval_s``, merge what peers
pushed, checkpoint. :meth:`LearningLoop.on_gossip` is the MQTT handler of ``dev/<id>/gossip``:
it reassembles and checks each model before handing it to the learner, and drops (and counts)
what it cannot use: ``not_learning``, ``wrong_model``, or a bad frame.

Learning may fail (bad local data, a model that cannot merge); serving never stops for it: the
error is kept for telemetry and the fleet is told this device no longer learns.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitfleet.errors import BitfleetError, require
from edge_agent.commands import CommandError
from edge_agent.config import ConfigError
from edge_agent.context import AgentContext
from edge_agent.protocol import (
    FrameKind,
    FrameRejected,
    ProtocolError,
    expect_binary,
    gossip_extra,
    gossip_info,
    seal_tensors,
    split_chunks,
)
from edge_agent.transport import TransportError

if TYPE_CHECKING:
    from edge_agent.learner import Learner

__all__ = ["LABEL_PROBS", "LearningLoop", "NOT_LEARNING", "WRONG_MODEL", "check_local_data"]

log = logging.getLogger("bitfleet.agent")

_ROUNDS_KEPT = 10_000  # rounds the metrics command can return (about 1 MB of JSON)

NOT_LEARNING = "not_learning"
"""Drop reason: a peer's model arrived while this device does not learn."""

WRONG_MODEL = "wrong_model"
"""Drop reason: a peer's model of another network than the one this device learns."""

LABEL_PROBS = "label_probs"
"""Optional tensor of ``train.safetensors``: one probability per class (a ``dirichlet-pool``
node). With it the device draws every training sample's label with these probabilities, then a
sample of that label from all of ``x``/``y``; without it, every batch is drawn uniformly."""


def check_local_data(data_dir: str) -> None:
    """Raise :class:`~edge_agent.config.ConfigError` unless ``data_dir`` holds usable local data.

    What the learner will read must be there: ``train.safetensors`` with tensors ``x`` (N x C x
    H x W images), ``y`` (N labels) and optionally ``label_probs`` (one probability per class,
    see :data:`LABEL_PROBS`). Only the file's header is read, and torch is not
    imported, so an agent started with ``learn`` on checks this before it serves and stops with
    one line, rather than failing later on its learning thread.
    """
    from safetensors import safe_open

    root = Path(data_dir).expanduser()
    train = root / "train.safetensors"
    if not root.is_dir():
        raise ConfigError(
            f"learn is on but data_dir {root} does not exist; pass --data-dir with the directory "
            "that holds train.safetensors"
        )
    if not train.is_file():
        raise ConfigError(
            f"learn is on but data_dir {root} has no train.safetensors (tensors x: N x C x H x W "
            "images, y: N labels; write them with safetensors.numpy.save_file)"
        )
    try:
        with safe_open(str(train), framework="numpy") as file:
            shapes = {name: list(file.get_slice(name).get_shape()) for name in file.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types, and OSError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{train} is not a readable safetensors file ({first})") from None
    x, y = shapes.get("x"), shapes.get("y")
    if x is None or y is None:
        raise ConfigError(f"{train} must hold tensors 'x' (images) and 'y' (labels)")
    if len(x) != 4 or len(y) != 1 or x[0] != y[0] or y[0] == 0:
        raise ConfigError(f"{train}: x must be N x C x H x W and y N labels, got {x} and {y}")
    probs = shapes.get(LABEL_PROBS)
    if probs is not None and (len(probs) != 1 or probs[0] == 0):
        raise ConfigError(f"{train}: {LABEL_PROBS} must be one probability per class, got {probs}")


class LearningLoop:
    """The learning thread of one agent, and what it sends and receives.

    Unusable gossip is counted in the context's ``drops``, by reason.

    Args:
        ctx: the agent's shared pieces (settings ``learning``, ``data_dir``, ``chunk_bytes``;
            the state directory, where the learner checkpoints).
        spec: the network spec of the served model (``None``: nothing to learn).
        start_point: the served artifact's digest and float weights (see
            :meth:`edge_agent.serving.ModelServer.learning_start`): learning starts from those
            weights, or from the network's seeded initialisation when the artifact has none,
            unless a checkpoint learned from the same artifact is there to resume.
        peers: ``peers(learning_only)``: the online peers.
        announce: re-publishes this device's state (learning on or off).
        stopping: set when the agent shuts down.
    """

    def __init__(
        self,
        ctx: AgentContext,
        *,
        spec: Callable[[], dict[str, Any] | None],
        start_point: Callable[[], tuple[str, dict[str, np.ndarray] | None] | None],
        peers: Callable[[bool], list[str]],
        announce: Callable[[], None],
        stopping: threading.Event,
    ) -> None:
        self.ctx = ctx
        self._spec = spec
        self._start_point = start_point
        self._peers = peers
        self._announce = announce
        self._stopping = stopping
        self.learner: Learner | None = None
        self.error: str | None = None
        #: Every round of this process's learning runs, oldest first (the ``metrics`` command);
        #: each run starts with its starting point (round r0, accuracy before training).
        self.rounds: deque[dict[str, Any]] = deque(maxlen=_ROUNDS_KEPT)
        self.push_failures = 0  # gossip pushes not acknowledged in time (broker gone, timeout)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def on(self) -> bool:
        """Learning is on: the thread runs and nobody asked it to stop (it may finish a round)."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stop.is_set()

    def start(self, overrides: Any) -> dict[str, Any]:
        """Build the learner (importing torch) and start the learning thread (``learn.start``)."""
        if self.on:
            raise CommandError("learning is already on; send learn.stop first")
        if self._thread is not None:
            self._thread.join()  # a stopped run may still be finishing its round
        spec = self._spec()
        if spec is None:
            raise CommandError("no model with a network spec is deployed; deploy one first")
        config = self.ctx.config
        if not config.data_dir:
            raise CommandError("no data_dir is configured; config.set data_dir first")
        settings = config.learning.updated(overrides)
        # torch and the models come with the `learn` extra, which a serving-only device omits
        require("torch", "learn", "on-device learning")
        from edge_agent.learner import Learner, load_local_data

        data = load_local_data(config.data_dir)
        origin, weights = self._start_point() or (None, None)
        learner = Learner(
            spec, data, settings, self.ctx.store, self.ctx.device, origin=origin, initial=weights
        )
        self.learner = learner
        self.rounds.append(_round_record(learner.round, learner.initial_accuracy, None, False))
        self._stop.clear()
        self.error = None
        self._thread = threading.Thread(target=self._loop, name="bitfleet-learn", daemon=True)
        self._thread.start()
        self._announce()
        return {"round": learner.round, "settings": asdict(settings)}

    def stop(self, wait: bool = True) -> None:
        """Ask the thread to stop after its round; with ``wait``, until it has."""
        self._stop.set()
        thread = self._thread
        if thread is not None and wait and thread is not threading.current_thread():
            thread.join()

    def stop_command(self, args: Any) -> dict[str, Any]:
        """``learn.stop``: stop, tell the fleet, and say where learning got to."""
        was = self.on
        self.stop(wait=True)
        self._announce()
        return {"stopped": was, "round": self.learner.round if self.learner else 0}

    def status(self) -> dict[str, Any]:
        """The ``learning`` part of telemetry."""
        learner = self.learner
        return {
            "on": self.on,
            "round": learner.round if learner else None,
            "accuracy": learner.metrics.get("accuracy") if learner else None,
            "merges": learner.merges if learner else None,
            "pending": learner.pending if learner else None,
            "error": self.error,
            "push_failures": self.push_failures,
        }

    # ---------------------------------------------------------------------------- the thread
    def _loop(self) -> None:
        learner = self.learner
        assert learner is not None
        settings = learner.settings
        try:
            while not self._stop.is_set() and not self._stopping.is_set():
                if settings.rounds and learner.round >= settings.rounds:
                    break
                metrics = learner.train_round()
                self._push(learner)
                self._stop.wait(settings.round_interval_s)
                merged = learner.merge()
                done = learner.finish_round(metrics, merged)
                loss = done.get("train_loss")
                self.rounds.append(_round_record(learner.round, done["accuracy"], loss, merged))
        except BitfleetError as err:
            log.warning("learning stopped: %s", err)
            self.error = str(err)
        except Exception as err:  # noqa: BLE001 - torch may fail too; serving must go on
            log.exception("learning stopped by an error")
            self.error = f"{type(err).__name__}: {err}"
        finally:
            self._stop.set()
            if not self._stopping.is_set():
                # a run that ended by itself (rounds reached, error) tells the fleet, so peers
                # stop sending models this device would drop
                self._announce()

    def _push(self, learner: Learner) -> None:
        peers = learner.choose_peers(self._peers(True))
        if not peers:
            return
        ctx = self.ctx
        frame = seal_tensors(
            learner.state(),
            codec=learner.settings.codec,
            binary_names=learner.binary_names,
            sender=ctx.device,
            keyring=ctx.keyring,
            extra=gossip_extra(learner.model_name, learner.round, len(learner.data)),
        )
        chunks = split_chunks(
            frame, chunk_bytes=ctx.config.chunk_bytes, sender=ctx.device, keyring=ctx.keyring
        )
        messages = [(ctx.topics.gossip(peer), chunk) for peer in peers for chunk in chunks]
        try:
            # flow-controlled: a model of more chunks than the transport's queue still arrives
            ctx.transport.publish_many(messages, qos=1, cancel=self._stop)
        except TransportError as err:
            if self._stop.is_set():  # learn.stop or shutdown cut the push short
                log.info("round %d: push to %s cut short: learning stops", learner.round, peers)
                return
            self.push_failures += 1
            log.warning("round %d: push to %s incomplete: %s", learner.round, peers, err)

    # ------------------------------------------------------------------------------- receipt
    def on_gossip(self, topic: str, payload: bytes) -> None:
        """MQTT handler of ``dev/<id>/gossip``: a peer's model, maybe in chunks."""
        verifier, drops = self.ctx.verifier, self.ctx.drops
        try:
            frame = verifier.receive(payload)
            if frame is None:
                return
            expect_binary(frame, FrameKind.GOSSIP)
        except FrameRejected:
            return  # the verifier counted it
        except ProtocolError as err:
            drops.count(err.reason)
            return
        learner = self.learner
        if learner is None or not self.on:
            drops.count(NOT_LEARNING)
            return
        info = gossip_info(frame)
        if info.model != learner.model_name:
            drops.count(WRONG_MODEL)
            return
        try:
            _, tensors = verifier.open_tensors(frame, learner.expected)
        except FrameRejected:
            return  # the verifier counted it
        learner.receive(frame.sender, tensors, info.samples)


def _round_record(
    round_: int, accuracy: float, train_loss: float | None, merged: bool
) -> dict[str, Any]:
    """One entry of :attr:`LearningLoop.rounds` (JSON: a NaN loss becomes None)."""
    if train_loss is not None and not math.isfinite(train_loss):
        train_loss = None
    return {
        "round": int(round_),
        "accuracy": float(accuracy),
        "train_loss": train_loss,
        "merged": bool(merged),
        "ts": time.time(),
    }
