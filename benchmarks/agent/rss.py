"""Memory of the serving daemon (part ``rss``).

Import-only baselines (python, numpy, onnxruntime, paho, numba, the agent module), RSS after
each step of the daemon's start-up (both in fresh interpreters, :mod:`.probes`), then
``python -m edge_agent.cli run`` (which execs ``python -m edge_agent.daemon``, leaving typer
behind) as a subprocess serving (a) LeNet-5 digits in the ``onnx-portable`` flavour (also with
``MALLOC_ARENA_MAX=2``), (b) Bi-Real-18 width 0.125 (ImageNet stem, 1x32x32) in the portable
and the fast ``onnx`` flavour and, unless ``--no-full-width``, (c) full-width Bi-Real-18 at
3x224x224 in the fast flavour. Each daemon answers 20 inference requests over MQTT, then its
VmRSS / VmHWM are read from ``/proc`` and ``torch_loaded`` from the ``status`` command's
telemetry.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from .common import (
    MB,
    Env,
    emit,
    import_baselines,
    pct,
    probe_argv,
    proc_status,
    python_output,
    running_daemon,
)

PART = "rss"

# label: the modules a fresh interpreter imports
IMPORT_PROBES: dict[str, list[str]] = {
    "python (nothing imported)": [],
    "numpy": ["numpy"],
    "numpy + onnxruntime + paho": ["numpy", "onnxruntime", "paho.mqtt.client"],
    "numpy + onnxruntime + paho + psutil": ["numpy", "onnxruntime", "paho.mqtt.client", "psutil"],
    "numpy + onnxruntime + paho + numba": ["numpy", "onnxruntime", "paho.mqtt.client", "numba"],
    "edge_agent.daemon + edge_agent.agent (what the daemon imports)": [
        "edge_agent.daemon",
        "edge_agent.agent",
        "psutil",
    ],
    "edge_agent.cli (typer, click, pydantic: the CLI, left behind by the exec)": [
        "edge_agent.cli",
        "typer._adapters",
    ],
}


def daemon_stages(env: Env) -> None:
    """RSS after each thing the serving daemon loads, in one process (no broker, no threads)."""
    artifact = env.artifact("lenet-portable")
    out = python_output(probe_argv("stages", str(artifact)))
    for line in out.splitlines():
        emit({"part": PART, "what": "daemon stages", **json.loads(line)})


def serving_rss(
    env: Env, kind: str, shape: tuple[int, ...], requests: int = 20, env_extra: dict | None = None
) -> None:
    """A serving-only daemon of artifact ``kind``: memory idle and after ``requests``."""
    import numpy as np

    artifact = env.artifact(kind)
    batch = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    with running_daemon(env, f"rss-{kind}", artifact, env_extra=env_extra) as daemon:
        fleet, device = daemon.fleet, daemon.device
        idle = proc_status(daemon.proc.pid)
        fleet.infer(device, batch, timeout=60)  # warm-up
        rtts, agent_ms = [], []
        for _ in range(requests):
            t0 = time.perf_counter()
            reply = fleet.infer(device, batch, timeout=60)
            rtts.append((time.perf_counter() - t0) * 1000)
            if not reply.get("ok"):
                raise RuntimeError(f"inference failed: {reply}")
            agent_ms.append(reply["result"]["latency_ms"])
        mem = proc_status(daemon.proc.pid)
        status = fleet.command(device, "status", timeout=30)["result"]
        tel = status["telemetry"]
    emit(
        {
            "part": PART,
            "what": "serving-only daemon",
            "artifact": kind,
            "env": env_extra or {},
            "format": json.loads((artifact / "manifest.json").read_text())["format"],
            "input_shape": list(shape),
            "artifact_mb": round(sum(f.stat().st_size for f in artifact.iterdir()) / MB, 2),
            "online_after_s": round(daemon.online_s, 2),
            "idle_after_online": idle,
            "after_requests": mem,
            "requests": requests,
            "request_transport": "base64 float32 (FleetClient.infer)",
            "infer_rtt_ms_p50": round(pct(rtts, 50), 2),
            "agent_predict_ms_p50": round(pct(agent_ms, 50), 3),
            "telemetry_rss_mb": round(tel["rss_mb"], 1),
            "torch_loaded": tel["torch_loaded"],
            "learning_on": tel["learning"]["on"],
            "config_threads": status["config"]["threads"],
            "exit_code": daemon.exit_code,
            "target_rss_mb": 80,
            "target_met": mem["VmRSS_mb"] <= 80 and not tel["torch_loaded"],
            "note": None,
        }
    )


def run(env: Env, args: argparse.Namespace) -> None:
    import_baselines(PART, IMPORT_PROBES)
    daemon_stages(env)
    serving_rss(env, "lenet-portable", (1, 32, 32))
    # glibc's malloc arenas: one per thread by default; an environment knob, no code change
    serving_rss(env, "lenet-portable", (1, 32, 32), env_extra={"MALLOC_ARENA_MAX": "2"})
    serving_rss(env, "bireal-w0125-portable", (1, 32, 32))
    serving_rss(env, "bireal-w0125-fast", (1, 32, 32))
    if args.full_width:
        serving_rss(env, "bireal-full-fast", (3, 224, 224))


def summarize(r: dict[str, Any]) -> str | None:
    """The summary line of one record of this part (None: not summarised)."""
    what = r.get("what")
    if what == "import-only":
        return f"rss  import-only  {r['label']:<60} VmRSS {r['VmRSS_mb']:6.1f} MB"
    if what == "daemon stages":
        return f"rss  stages  {r['stage']:<60} VmRSS {r['VmRSS_mb']:6.1f} MB"
    if what == "serving-only daemon":
        m = r["after_requests"]
        env = " ".join(f"{k}={v}" for k, v in r["env"].items())
        label = r["artifact"] + (" " + env if env else "")
        shape = "x".join(map(str, r["input_shape"]))
        return (
            f"rss  daemon {label:<40} {shape:<9} VmRSS "
            f"{m['VmRSS_mb']:6.1f} MB  VmHWM {m['VmHWM_mb']:6.1f} MB  threads "
            f"{m['threads']}  torch_loaded={r['torch_loaded']}  <=80 MB: {r['target_met']}"
        )
    return None
