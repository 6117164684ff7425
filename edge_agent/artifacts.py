"""Artifact downloads for ``deploy``: collect the retained chunks, check them, install.

The laptop publishes an artifact as retained, signed chunks of one artifact frame
(:func:`edge_agent.protocol.artifact_messages`). A ``deploy`` command names it and its SHA-256
(:class:`edge_agent.protocol.DeployArgs`); :meth:`ArtifactDownloads.fetch` subscribes to the
artifact's chunk topics, puts the frame back together with
:meth:`edge_agent.protocol.FrameVerifier.receive` (the reassembly gossip uses too), and returns
the .tar bytes only if their SHA-256 is the one the command names. :meth:`install` verifies and
installs them in the state directory, which :class:`edge_agent.serving.ModelServer` then serves.
Every failure is an :class:`~exporters.artifact.ArtifactError` whose message is the reply's
``error``; the model that serves keeps serving.
"""

from __future__ import annotations

import hashlib
import queue
import shutil
import tempfile
import time
from pathlib import Path

from edge_agent.context import AgentContext
from edge_agent.protocol import DeployArgs, FrameKind, FrameRejected, FrameVerifier
from edge_agent.state import ArtifactRef, StateError
from exporters.artifact import ArtifactError

__all__ = ["ArtifactDownloads", "MAX_ARTIFACT_BYTES"]

MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
"""The largest artifact a device downloads (the .tar bytes)."""

_FRAME_ROOM = 65536  # what the artifact frame adds around the .tar bytes, with a margin
_POLL_S = 0.5


class ArtifactDownloads:
    """Fetches artifacts from the broker and installs them in the state directory.

    A refused artifact frame is counted in the context's ``drops``, by reason.
    """

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx

    def download(self, args: DeployArgs) -> ArtifactRef:
        """Fetch and install the artifact ``args`` name; its slot, not yet served."""
        return self.install(self.fetch(args), label=f"{args.name} {args.version}")

    def fetch(self, args: DeployArgs) -> bytes:
        """The artifact's .tar bytes, once every chunk arrived and the SHA-256 matches."""
        what = f"artifact {args.name} {args.version}"
        limit = MAX_ARTIFACT_BYTES + _FRAME_ROOM
        verifier = FrameVerifier(
            self.ctx.keyring,
            max_frame_bytes=limit,
            reassembly_timeout_s=args.timeout_s,
            reassembly_max_bytes=limit,
        )
        transport = self.ctx.transport
        topic = self.ctx.topics.artifact_chunks(args.name, args.version)
        inbox: queue.Queue[bytes] = queue.Queue()
        transport.subscribe(topic, lambda _topic, payload: inbox.put(payload))
        deadline = time.monotonic() + args.timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ArtifactError(
                        f"{what} did not arrive within {args.timeout_s:.0f} s (publish it "
                        "first: its chunks are retained on the artifacts topic)"
                    )
                try:
                    payload = inbox.get(timeout=min(left, _POLL_S))
                except queue.Empty:
                    continue
                try:
                    frame = verifier.receive(payload, retained=True)
                except FrameRejected as err:
                    self.ctx.drops.count(err.reason)
                    raise ArtifactError(f"{what} refused: {err}") from None
                if frame is None or frame.type != FrameKind.ARTIFACT or not frame.binary:
                    continue
                found = hashlib.sha256(frame.body).hexdigest()
                if found != args.sha256:
                    raise ArtifactError(
                        f"{what} has SHA-256 {found[:12]}..., the deploy command expects "
                        f"{args.sha256[:12]}...: refused, the old model keeps serving"
                    )
                return frame.body
        finally:
            transport.unsubscribe(topic)

    def install(self, data: bytes, label: str = "the deployed artifact") -> ArtifactRef:
        """Verify and install .tar bytes in the state directory; the slot.

        Errors name the artifact as ``label`` (its name and version), not the staging file.
        """
        store = self.ctx.store
        folder: Path | None = None
        try:
            folder = Path(tempfile.mkdtemp(prefix="deploy-", dir=store.root))
            tar = folder / "artifact.tar"
            tar.write_bytes(data)
            return store.install(tar, label=label)
        except OSError as err:
            raise StateError(
                f"cannot stage the artifact in {store.root}: {err.strerror or err}"
            ) from None
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
