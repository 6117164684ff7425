"""Memory of the serving daemon (part ``rss``).

Import-only baselines (python, numpy, onnxruntime, paho, onnx for comparison, the native
kernels, the agent module), RSS after each step of the daemon's start-up (both in fresh
interpreters, :mod:`.probes`; the fast flavour's steps, with the native library, bitfleet's
ONNX reader and the ORT segment sessions, by :func:`fast_stages`), then
``python -m edge_agent.cli run`` (which execs ``python -m edge_agent.daemon``, leaving typer
behind) as a subprocess serving (a) LeNet-5
digits in the ``onnx-portable`` flavour (also with ``MALLOC_ARENA_MAX=2``) and the fast
``onnx`` flavour, (b) Bi-Real-18 width 0.125 (ImageNet stem, 1x32x32) in the portable and the
fast flavour and, unless ``--no-full-width``, (c) full-width Bi-Real-18 at 3x224x224 in the
fast flavour. Each daemon answers 20 inference requests over MQTT, then its
VmRSS / VmHWM are read from ``/proc`` and ``torch_loaded`` from the ``status`` command's
telemetry.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .common import (
    ARTIFACTS,
    MB,
    Env,
    emit,
    import_baselines,
    pct,
    probe_argv,
    proc_status,
    python_output,
    running_daemon,
    worker_argv,
)

PART = "rss"

# label: the modules a fresh interpreter imports
IMPORT_PROBES: dict[str, list[str]] = {
    "python (nothing imported)": [],
    "numpy": ["numpy"],
    "numpy + onnxruntime + paho": ["numpy", "onnxruntime", "paho.mqtt.client"],
    "numpy + onnxruntime + paho + psutil": ["numpy", "onnxruntime", "paho.mqtt.client", "psutil"],
    "numpy + onnxruntime + paho + onnx (which the device no longer loads)": [
        "numpy",
        "onnxruntime",
        "paho.mqtt.client",
        "onnx",
    ],
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


# Artifacts this part serves that common.ARTIFACTS lacks, in its form (arch, options, format,
# input shape, name); exported by this module's ``export`` worker.
EXTRA_ARTIFACTS: dict[str, tuple[str, dict[str, Any], str, tuple[int, ...], str]] = {
    "lenet-fast": ("lenet5", {}, "onnx", (1, 32, 32), "digits"),
}

# Run with ``python -c`` from the repository (no runpy, no package ``__init__``), so the figures
# compare with the import-only probes of :mod:`.probes`. argv: [artifact folder or "-"].
_FAST_PROBE = r"""
import json, sys
rows = []
def rss(label, **extra):
    fields = dict(line.split(':', 1) for line in open('/proc/self/status'))
    mb = lambda key: round(int(fields[key].split()[0]) / 1024, 1)
    rows.append({'stage': label, 'VmRSS_mb': mb('VmRSS'), 'VmHWM_mb': mb('VmHWM'),
                 'RssAnon_mb': mb('RssAnon'), 'RssFile_mb': mb('RssFile'),
                 'threads': int(fields['Threads']), 'torch_loaded': 'torch' in sys.modules,
                 **extra})
artifact = sys.argv[1]
rss('python, nothing imported')
if artifact == '-':
    import numpy, onnxruntime, paho.mqtt.client
    from exporters import kernels
    isa = kernels.backend()  # loads the native library
    rss('numpy + onnxruntime + paho + exporters.kernels (native library)', kernels_isa=isa)
else:
    import edge_agent.daemon, edge_agent.agent
    rss('+ edge_agent.daemon + edge_agent.agent (numpy, paho, protocol)')
    from exporters import kernels
    isa = kernels.backend()
    rss('+ exporters.kernels, native library loaded', kernels_isa=isa)
    import glob
    from exporters import onnx_proto
    model = onnx_proto.read_model(open(glob.glob(artifact + '/*.onnx')[0], 'rb').read())
    del model
    rss('+ exporters.onnx_proto reads the graph (no onnx package)')
    import numpy as np
    from exporters import runtime
    predictor = runtime.load(artifact, threads=1)
    kinds = [kind for kind, _ in predictor.steps]
    rss(f'+ runtime.load (float parts in {predictor.float_ops}, prepared binary weights)',
        ort_sessions=kinds.count('ort'), numpy_segments=kinds.count('numpy'),
        binary_steps=kinds.count('binary'), onnxruntime_loaded='onnxruntime' in sys.modules)
    predictor.predict(np.zeros((2, *predictor.input_shape), np.float32))
    rss('+ health-check predict (batch 2)', onnx_loaded='onnx' in sys.modules)
for row in rows[1:]:
    print(json.dumps(row), flush=True)
"""


def artifact(env: Env, kind: str) -> Path:
    """The artifact folder of ``kind``: :meth:`Env.artifact`, or this module's extra kinds."""
    if kind in ARTIFACTS:
        return env.artifact(kind)
    if kind not in EXTRA_ARTIFACTS:
        raise SystemExit(f"unknown artifact {kind}")
    out = env.work / "art" / kind
    if not (out / "manifest.json").exists():
        start = time.monotonic()
        python_output(worker_argv("rss", "export", kind=kind, out=out))
        print(f"# exported {kind} in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return out


def export_extra(kind: str, out: Path) -> None:
    """Export the model of extra artifact ``kind`` (seed 0) to ``out`` (imports torch)."""
    import torch

    import exporters
    import models

    arch, options, fmt, shape, name = EXTRA_ARTIFACTS[kind]
    torch.manual_seed(0)
    model = models.create(arch, **options)
    exporters.export(
        model.eval(), out, fmt, name=name, version="1", input_shape=shape, overwrite=True
    )


def native_baseline() -> None:
    """The import-only baseline of the fast flavour's libraries, native library loaded."""
    out = python_output([sys.executable, "-c", _FAST_PROBE, "-"])
    for line in out.splitlines():
        row = json.loads(line)
        emit({"part": PART, "what": "import-only", "label": row.pop("stage"), **row})


def fast_stages(env: Env, kind: str) -> None:
    """RSS after each thing the serving daemon loads for a fast-flavour artifact, one process."""
    out = python_output([sys.executable, "-c", _FAST_PROBE, str(artifact(env, kind))])
    for line in out.splitlines():
        emit({"part": PART, "what": "daemon stages", "artifact": kind, **json.loads(line)})


def daemon_stages(env: Env) -> None:
    """RSS after each thing the serving daemon loads, in one process (no broker, no threads)."""
    folder = artifact(env, "lenet-portable")
    out = python_output(probe_argv("stages", str(folder)))
    for line in out.splitlines():
        emit(
            {
                "part": PART,
                "what": "daemon stages",
                "artifact": "lenet-portable",
                **json.loads(line),
            }
        )


def serving_rss(
    env: Env, kind: str, shape: tuple[int, ...], requests: int = 20, env_extra: dict | None = None
) -> None:
    """A serving-only daemon of artifact ``kind``: memory idle and after ``requests``."""
    import numpy as np

    folder = artifact(env, kind)
    batch = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    with running_daemon(env, f"rss-{kind}", folder, env_extra=env_extra) as daemon:
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
            "format": json.loads((folder / "manifest.json").read_text())["format"],
            "input_shape": list(shape),
            "artifact_mb": round(sum(f.stat().st_size for f in folder.iterdir()) / MB, 2),
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
    native_baseline()
    daemon_stages(env)
    fast_stages(env, "lenet-fast")
    fast_stages(env, "bireal-w0125-fast")
    if args.full_width:
        fast_stages(env, "bireal-full-fast")
    serving_rss(env, "lenet-portable", (1, 32, 32))
    # glibc's malloc arenas: one per thread by default; an environment knob, no code change
    serving_rss(env, "lenet-portable", (1, 32, 32), env_extra={"MALLOC_ARENA_MAX": "2"})
    serving_rss(env, "lenet-fast", (1, 32, 32))
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
        stage = f"[{r.get('artifact', 'lenet-portable')}] {r['stage']}"
        return f"rss  stages  {stage:<80} VmRSS {r['VmRSS_mb']:6.1f} MB"
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


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -m benchmarks.agent.rss --worker export --kind K --out D``."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.agent.rss",
        description="Worker of the rss part (started by the benchmark): export an extra artifact.",
    )
    ap.add_argument("--worker", required=True, choices=["export"])
    ap.add_argument("--kind", required=True, choices=sorted(EXTRA_ARTIFACTS))
    ap.add_argument("--out", required=True, type=Path, help="artifact folder to write")
    args = ap.parse_args(argv)
    export_extra(args.kind, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
