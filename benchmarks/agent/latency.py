"""Gossip frame latency on loopback (part ``latency``).

A sender seals a ~1 MiB fp32 model (``seal_tensors`` + ``split_chunks``, ``--chunk-bytes``
chunks) and publishes the chunks QoS 1 to a receiver in another process, which runs
``FrameVerifier.receive`` + ``open_tensors`` in its MQTT callback, as the agent does
(:class:`.common.Link`). The receiver stamps CLOCK_MONOTONIC (shared by both processes) when the
tensors are decoded; p50/p95 of first-publish -> decoded, one transfer at a time, after
``--warmup``, over ``--repeats``. Plus a one-chunk 1 KiB frame. Runs with Nagle's algorithm on
everywhere (as before the fix), then as shipped (``set_tcp_nodelay true`` in Mosquitto,
TCP_NODELAY on both clients' sockets); ``--no-nodelay-variant`` skips the first.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import MB, SENDER, Env, Link, each_link, emit, pct

PART = "latency"


def random_model(total_bytes: int, n_tensors: int = 4) -> dict[str, Any]:
    """``n_tensors`` random float32 vectors of ``total_bytes`` in all (seed 0)."""
    import numpy as np

    rng = np.random.default_rng(0)
    per = total_bytes // 4 // n_tensors
    return {
        f"layer{i}.weight": rng.standard_normal(per).astype(np.float32) for i in range(n_tensors)
    }


def measure(link: Link, model: str, tensors: dict[str, Any], args: argparse.Namespace) -> None:
    """``--warmup`` + ``--repeats`` transfers of ``tensors``, one at a time; one record."""
    from edge_agent.protocol import seal_tensors

    publish_ms, total_ms, seal_ms = [], [], []
    n_chunks = frame_bytes = 0
    for i in range(args.warmup + args.repeats):
        t0 = time.monotonic()
        frame = seal_tensors(
            tensors,
            codec="fp32",
            sender=SENDER,
            keyring=link.keyring,
            extra={"seq": i, "model": model, "round": i, "samples": 1},
        )
        t1, ack, n_chunks = link.transfer(frame, i)
        if i >= args.warmup:
            seal_ms.append((t1 - t0) * 1000)
            publish_ms.append((ack["t_done"] - t1) * 1000)
            total_ms.append((ack["t_done"] - t0) * 1000)
        frame_bytes = len(frame)
    emit(
        {
            "part": PART,
            "tcp": link.label,
            "model": model,
            "frame_bytes": frame_bytes,
            "chunks": n_chunks,
            "chunk_bytes": args.chunk_bytes,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "publish_to_decoded_ms": {
                "p50": round(pct(publish_ms, 50), 2),
                "p95": round(pct(publish_ms, 95), 2),
                "max": round(max(publish_ms), 2),
            },
            "seal_split_ms_p50": round(pct(seal_ms, 50), 2),
            "seal_to_decoded_ms": {
                "p50": round(pct(total_ms, 50), 2),
                "p95": round(pct(total_ms, 95), 2),
            },
        }
    )


def run(env: Env, args: argparse.Namespace) -> None:
    cases = {"1MiB": random_model(MB), "1KiB": random_model(1024, 1)}
    expected = {k: {n: list(t.shape) for n, t in v.items()} for k, v in cases.items()}

    def body(link: Link) -> None:
        for model, tensors in cases.items():
            measure(link, model, tensors, args)

    each_link(env, args, PART, expected, body)


def summarize(r: dict[str, Any]) -> str | None:
    """The summary line of one record of this part (None: not summarised)."""
    if "model" not in r:
        return None
    p = r["publish_to_decoded_ms"]
    return (
        f"latency  [{r['tcp']}] {r['model']:<5} {r['chunks']} chunk(s)  "
        f"publish->decoded p50 "
        f"{p['p50']} ms  p95 {p['p95']} ms  (seal+split p50 {r['seal_split_ms_p50']} ms)"
    )
