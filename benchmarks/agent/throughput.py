"""Chunked transfer throughput on loopback (part ``throughput``).

A ``--payload-mb`` (default 16 MiB) signed ``artifact`` frame cut into ``--chunk-bytes``
signed chunks, reassembled and verified (HMAC per chunk, SHA-256 and HMAC of the whole) at the
receiver process (:class:`.common.Link`): MiB/s, one warm-up then the median of
``--throughput-repeats``. Nagle on, then as shipped, like the latency part. As shipped, also
one burst of ``--burst-mb`` (default 32 MiB) published fire-and-forget and one with
``publish_many`` (flow-controlled, as the agent pushes models), to show the transport's
100-message QoS 1 queue limit (``--burst-mb 0`` skips them).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import time
from typing import Any

from .common import MB, SENDER, Env, Link, each_link, emit, pct

PART = "throughput"


def _seal_artifact(link: Link, data: bytes, **header: Any) -> bytes:
    """An ``artifact`` frame of ``data``; ``header`` must hold its ``sha256``."""
    from edge_agent.protocol import seal_binary

    return seal_binary("artifact", header, data, sender=SENDER, keyring=link.keyring)


def measure(link: Link, args: argparse.Namespace) -> None:
    """One warm-up and ``--throughput-repeats`` transfers of the payload; one record."""
    size = int(args.payload_mb * MB)
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()  # outside the timed seal + split
    rates, rates_incl, seal_ms = [], [], []
    n_chunks = 0
    for i in range(1 + args.throughput_repeats):
        t0 = time.monotonic()
        frame = _seal_artifact(link, data, name="bench", version=str(i), sha256=digest, seq=i)
        t1, ack, n_chunks = link.transfer(frame, i)
        if i >= 1:  # first is warm-up
            rates.append(size / MB / (ack["t_done"] - t1))
            rates_incl.append(size / MB / (ack["t_done"] - t0))
            seal_ms.append((t1 - t0) * 1000)
    emit(
        {
            "part": PART,
            "tcp": link.label,
            "payload_mib": args.payload_mb,
            "chunks": n_chunks,
            "chunk_bytes": args.chunk_bytes,
            "repeats": args.throughput_repeats,
            "mib_per_s_publish_to_verified": {
                "median": round(pct(rates, 50), 1),
                "runs": [round(r, 1) for r in rates],
            },
            "mib_per_s_incl_seal_split": round(pct(rates_incl, 50), 1),
            "seal_split_ms_p50": round(pct(seal_ms, 50), 1),
        }
    )


def burst(link: Link, args: argparse.Namespace, method: str) -> dict[str, Any]:
    """One frame of more chunks than the transport's QoS 1 queue (``max_queued`` = 100, in
    flight included): ``publish`` fire-and-forget (what ``Agent._push`` did before), or
    ``publish_many`` (flow-controlled, what it does now)."""
    seq = -1 if method == "publish" else -2
    data = os.urandom(int(args.burst_mb * MB))
    digest = hashlib.sha256(data).hexdigest()
    frame = _seal_artifact(link, data, name="burst", version=method, seq=seq, sha256=digest)
    chunks = link.chunks(frame)
    before = link.tx.dropped_publishes
    t0 = time.monotonic()
    try:
        if method == "publish":
            _, ack = link.send(chunks, timeout=20)
        else:
            link.tx.publish_many([(link.topic, chunk) for chunk in chunks], qos=1)
            ack = link.acks.get(timeout=20)
        completed = "error" not in ack and ack.get("seq") == seq
        seconds = ack["t_done"] - t0 if completed else None
    except queue.Empty:
        completed, seconds = False, None
    return {
        "part": PART,
        "what": f"burst via {method}",
        "payload_mib": args.burst_mb,
        "chunks": len(chunks),
        "dropped_publishes": link.tx.dropped_publishes - before,
        "completed": completed,
        "mib_per_s": round(args.burst_mb / seconds, 1) if seconds else None,
    }


def run(env: Env, args: argparse.Namespace) -> None:
    def body(link: Link) -> None:
        measure(link, args)
        if args.burst_mb and link.nodelay:
            for method in ("publish", "publish_many"):
                emit(burst(link, args, method))

    each_link(env, args, PART, {}, body)


def summarize(r: dict[str, Any]) -> str | None:
    """The summary line of one record of this part (None: not summarised)."""
    what = r.get("what", "")
    if "mib_per_s_publish_to_verified" in r:
        return (
            f"throughput  [{r['tcp']}] {r['payload_mib']} MiB in {r['chunks']} chunks: "
            f"{r['mib_per_s_publish_to_verified']['median']} MiB/s publish->verified, "
            f"{r['mib_per_s_incl_seal_split']} MiB/s incl. seal+split"
        )
    if what.startswith("burst via"):
        return (
            f"throughput  {what} {r['payload_mib']} MiB ({r['chunks']} chunks): dropped "
            f"{r['dropped_publishes']} publishes, completed={r['completed']}"
        )
    return None
