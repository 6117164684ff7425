"""Commands and requests: the table from each protocol command to its handler, and dispatch.

A :class:`CommandTable` maps every name of :data:`edge_agent.protocol.COMMANDS` to a
:class:`Handler` (built by :class:`edge_agent.agent.Agent` from its parts) and refuses to be
built with one missing, so a command added to the protocol cannot go unhandled. Running a
request always yields a reply body (:func:`edge_agent.protocol.reply_body`):

- an unknown name gets ``"unknown command 'x'; known: ping, status, ..."``;
- a :class:`~bitfleet.errors.BitfleetError` from the handler (a bad argument, an artifact that
  does not verify, a state directory that cannot be written) gets its one-line message;
- anything else is a bug: logged with its traceback and answered as an internal error, and the
  agent serves on.

:class:`RequestDispatcher` is what the MQTT handlers of ``dev/<id>/cmd`` and ``dev/<id>/infer``
call: it opens and checks each frame (a frame that fails is dropped and counted, never raised),
runs fast commands at once and hands slow ones (``deploy``, ``rollback``, ``learn.start``) to
the :class:`Worker` thread, off the MQTT network thread, in order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from bitfleet.errors import BitfleetError
from edge_agent.config import RUNTIME_KEYS, AgentConfig, apply
from edge_agent.context import AgentContext
from edge_agent.protocol import (
    COMMANDS,
    CommandRequest,
    FrameKind,
    FrameRejected,
    ProtocolError,
    expect_json,
    parse_command,
    parse_infer,
    reply_body,
    split_chunks,
)

__all__ = [
    "CommandError",
    "CommandTable",
    "Handler",
    "RequestDispatcher",
    "Worker",
    "answer_ping",
    "config_set",
]

log = logging.getLogger("bitfleet.agent")

Args = Mapping[str, Any]


class CommandError(BitfleetError):
    """A command that cannot be carried out; its message becomes the reply's ``error``."""


@dataclass(frozen=True)
class Handler:
    """What carries out one command.

    Attributes:
        run: ``run(args) -> result``, the reply's ``result`` (a JSON object).
        slow: runs on the :class:`Worker` thread rather than the MQTT network thread.
    """

    run: Callable[[Args], dict[str, Any]]
    slow: bool = False


class CommandTable:
    """Every protocol command and its handler.

    Raises ``ValueError`` if ``handlers`` does not name exactly :data:`COMMANDS`.
    """

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        missing = [name for name in COMMANDS if name not in handlers]
        unknown = sorted(set(handlers) - set(COMMANDS))
        if missing or unknown:
            raise ValueError(f"command table: no handler for {missing}, unknown {unknown}")
        self._handlers = dict(handlers)

    @property
    def names(self) -> tuple[str, ...]:
        """The commands this table answers, in protocol order."""
        return COMMANDS

    def is_slow(self, name: str) -> bool:
        """Whether command ``name`` runs on the worker thread."""
        handler = self._handlers.get(name)
        return handler is not None and handler.slow

    def run(self, request: CommandRequest) -> dict[str, Any]:
        """Carry out ``request``; the reply body, whatever happens."""
        handler = self._handlers.get(request.name)
        if handler is None:
            known = ", ".join(COMMANDS)
            return reply_body(
                request.id, request.name, error=f"unknown command {request.name!r}; known: {known}"
            )
        try:
            result = handler.run(request.args)
        except BitfleetError as err:
            return reply_body(request.id, request.name, error=str(err))
        except Exception as err:  # noqa: BLE001 - a bug: keep its traceback, answer, serve on
            log.exception("command %s failed", request.name)
            problem = f"internal error: {type(err).__name__}: {err}"
            return reply_body(request.id, request.name, error=problem)
        return reply_body(request.id, request.name, result)


class Worker:
    """One background thread that runs jobs in order (slow commands, learning at start-up)."""

    def __init__(self, name: str = "bitfleet-worker") -> None:
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Callable[[], object]) -> None:
        """Run ``job()`` after the jobs already submitted."""
        self._jobs.put(job)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already submitted, then end the thread (waiting up to ``timeout``)."""
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BitfleetError as err:
                log.warning("%s", err)
            except Exception:  # noqa: BLE001 - a bug in one job must not stop the next ones
                log.exception("background job failed")


class RequestDispatcher:
    """Opens command and inference frames, runs them, and sends the replies.

    Commands sealed for another device are dropped; requests that break the protocol are
    counted in the context's ``drops`` by reason (the verifier counts the frames it refuses).

    Args:
        ctx: the agent's shared pieces.
        table: the command handlers.
        infer: ``infer(inputs) -> result``, for inference requests.
        worker: runs slow commands.
    """

    def __init__(
        self,
        ctx: AgentContext,
        table: CommandTable,
        infer: Callable[[Any], dict[str, Any]],
        worker: Worker,
    ) -> None:
        self.ctx = ctx
        self.table = table
        self._infer = infer
        self._worker = worker

    def reply(self, body: dict[str, Any]) -> None:
        """Send a reply body on ``dev/<id>/reply``: one message, in chunks only if too big.

        A body that cannot be sealed (a result holding NaN, say: a bug) is logged and replaced
        by an error reply, so the sender still gets an answer.
        """
        ctx = self.ctx
        try:
            frame = ctx.seal(FrameKind.REPLY, body)
        except ProtocolError as err:
            log.error("reply to %s %r is not JSON: %s", body.get("name"), body.get("id"), err)
            problem = f"internal error: the reply is not JSON ({err})"
            frame = ctx.seal(
                FrameKind.REPLY, reply_body(body.get("id"), body.get("name"), error=problem)
            )
        chunks = [frame]
        if len(frame) > ctx.transport.max_packet_bytes:
            chunks = split_chunks(
                frame, chunk_bytes=ctx.config.chunk_bytes, sender=ctx.device, keyring=ctx.keyring
            )
        for chunk in chunks:
            ctx.transport.publish(ctx.topics.reply(ctx.device), chunk, qos=1)

    def _open(self, payload: bytes, kind: str) -> dict[str, Any] | None:
        """The JSON body of a ``kind`` frame, or ``None`` when the frame is dropped."""
        try:
            return expect_json(self.ctx.verifier.open(payload), kind)
        except FrameRejected:
            return None  # the verifier counted it
        except ProtocolError as err:
            self.ctx.drops.count(err.reason)
            return None

    def on_command(self, topic: str, payload: bytes) -> None:
        """MQTT handler of ``dev/<id>/cmd``."""
        body = self._open(payload, FrameKind.CMD)
        if body is None:
            return
        try:
            request = parse_command(body, target=self.ctx.device)
        except ProtocolError as err:
            if err.reply is not None:
                self.reply(err.reply)
            else:
                self.ctx.drops.count(err.reason)
            return
        if self.table.is_slow(request.name):
            self._worker.submit(lambda: self.reply(self.table.run(request)))
        else:
            self.reply(self.table.run(request))

    def on_infer(self, topic: str, payload: bytes) -> None:
        """MQTT handler of ``dev/<id>/infer``."""
        body = self._open(payload, FrameKind.INFER)
        if body is None:
            return
        try:
            request = parse_infer(body)
        except ProtocolError as err:
            self.ctx.drops.count(err.reason)
            return
        try:
            reply = reply_body(request.id, FrameKind.INFER, self._infer(request.inputs))
        except BitfleetError as err:
            reply = reply_body(request.id, FrameKind.INFER, error=str(err))
        self.reply(reply)


# ------------------------------------------------------------------------- simple handlers
def answer_ping(args: Args) -> dict[str, Any]:
    """``ping``: the device is there and answering."""
    return {"pong": True, "ts": time.time()}


def config_set(ctx: AgentContext, args: Args) -> dict[str, Any]:
    """``config.set``: change run-time settings now and in the state directory's config.json.

    Raises :class:`CommandError` for settings that need a restart and
    :class:`~edge_agent.config.ConfigError` for bad values; nothing changes then.
    """
    config, store = ctx.config, ctx.store
    bad = [k for k in args if k not in RUNTIME_KEYS and not k.startswith("learn_")]
    if bad:
        raise CommandError(
            f"cannot change {', '.join(sorted(bad))} at run time; changeable: "
            f"{', '.join(sorted(RUNTIME_KEYS))} and learn_* keys (restart for the others)"
        )
    trial = AgentConfig(**{**asdict(config), "learning": config.learning})
    apply(trial, args, "config.set")
    trial.check()
    apply(config, args, "config.set")
    store.save_config_overrides({**store.config_overrides(), **args})
    return {"applied": dict(args)}
