"""Memory of the daemon while it learns (part ``learn-rss``).

Import-only baselines for torch and the learner, then the LeNet daemon with
``--learn --data-dir D`` (digits train/test as safetensors), measured after ``--learn-rounds``
learning rounds (read from the ``status`` telemetry) and again after 20 inference requests.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import Env, emit, import_baselines, pct, proc_status, running_daemon

PART = "learn-rss"

IMPORT_PROBES: dict[str, list[str]] = {
    "torch": ["torch"],
    "edge_agent.learner (torch, models, merge)": ["edge_agent.learner"],
}


def run(env: Env, args: argparse.Namespace) -> None:
    import numpy as np

    import_baselines(PART, IMPORT_PROBES)
    artifact = env.artifact("lenet-portable")
    data = env.digits_dir()
    threads = {"OMP_NUM_THREADS": str(args.learn_threads)} if args.learn_threads else None
    with running_daemon(
        env, "rss-learner", artifact, "--learn", "--data-dir", str(data), env_extra=threads
    ) as daemon:
        fleet, device = daemon.fleet, daemon.device
        rounds_seen, tel, first_round_s = 0, {}, None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            tel = fleet.command(device, "status", timeout=30)["result"]["telemetry"]
            rounds_seen = tel["learning"]["round"] or 0
            if rounds_seen >= 1 and first_round_s is None:
                first_round_s = time.monotonic() - daemon.started
            if rounds_seen >= args.learn_rounds or tel["learning"]["error"]:
                break
            time.sleep(0.5)
        mem = proc_status(daemon.proc.pid)
        batch = np.random.default_rng(0).standard_normal((1, 1, 32, 32), np.float32)
        rtts = []
        for _ in range(20):
            t0 = time.perf_counter()
            reply = fleet.infer(device, batch, timeout=60)
            if not reply.get("ok"):
                raise RuntimeError(f"inference failed while learning: {reply}")
            rtts.append((time.perf_counter() - t0) * 1000)
        mem_after = proc_status(daemon.proc.pid)
    emit(
        {
            "part": PART,
            "what": "learning daemon (LeNet-5, digits 1347 train / 450 test)",
            "rounds": rounds_seen,
            "accuracy": tel["learning"]["accuracy"],
            "learn_error": tel["learning"]["error"],
            "first_round_after_s": first_round_s and round(first_round_s, 2),
            "after_rounds": mem,
            "after_20_requests_while_learning": mem_after,
            "infer_rtt_ms_p50_while_learning": round(pct(rtts, 50), 2),
            "telemetry_rss_mb": round(tel["rss_mb"], 1),
            "torch_loaded": tel["torch_loaded"],
            "omp_num_threads": args.learn_threads or None,
            "exit_code": daemon.exit_code,
        }
    )


def summarize(r: dict[str, Any]) -> str | None:
    """The summary line of one record of this part (None: not summarised)."""
    if r.get("what") == "import-only":
        return f"learn-rss  import-only  {r['label']:<53} VmRSS {r['VmRSS_mb']:6.1f} MB"
    if "after_rounds" in r:
        m = r["after_rounds"]
        return (
            f"learn-rss  rounds {r['rounds']}  VmRSS {m['VmRSS_mb']:.1f} MB  VmHWM "
            f"{m['VmHWM_mb']:.1f} MB  threads {m['threads']}  torch={r['torch_loaded']}"
        )
    return None
