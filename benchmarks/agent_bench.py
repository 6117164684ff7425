"""Edge agent benchmarks (issue 6): memory, gossip latency, chunked throughput, 100 agents.

Every part starts its own Mosquitto on a free loopback port (:class:`MosquittoBroker`) and
talks to real agents through the real protocol (signed frames, :class:`MqttTransport`,
:class:`toolkit.fleet.FleetClient`). Parts, each runnable alone with ``--part``:

- ``rss``: import-only baselines (python, numpy, onnxruntime, paho, numba, the agent module),
  RSS after each step of the daemon's start-up, then ``python -m edge_agent.cli run`` (which
  execs ``python -m edge_agent.daemon``, leaving typer behind) as a
  subprocess serving (a) LeNet-5 digits in the ``onnx-portable`` flavour (also with
  ``MALLOC_ARENA_MAX=2``), (b) Bi-Real-18 width 0.125 (ImageNet stem, 1x32x32) in the
  portable and the fast ``onnx`` flavour and, unless ``--no-full-width``, (c) full-width
  Bi-Real-18 at 3x224x224 in the fast flavour. Each daemon answers 20 inference requests over
  MQTT, then its VmRSS / VmHWM are read from ``/proc`` and ``torch_loaded`` from the
  ``status`` command's telemetry.
- ``learn-rss``: the LeNet daemon with ``--learn --data-dir D`` (digits train/test as
  safetensors), measured after ``--learn-rounds`` learning rounds (read from telemetry).
- ``latency``: a sender seals a ~1 MiB fp32 model (``seal_tensors`` + ``split_chunks``, 256 KiB
  chunks) and publishes the chunks QoS 1 to a receiver in another process, which runs
  ``FrameVerifier.receive`` + ``open_tensors`` in its MQTT callback, as the agent does. The
  receiver stamps CLOCK_MONOTONIC (shared by both processes) when the tensors are decoded;
  p50/p95 of first-publish -> decoded, one transfer at a time. Plus a one-chunk 1 KiB frame.
  Latency and throughput run twice: as shipped (``set_tcp_nodelay true`` in Mosquitto,
  TCP_NODELAY on both clients' sockets), and with Nagle's algorithm left on everywhere, as
  before the fix (``--no-nodelay-variant`` skips that one).
- ``throughput``: a 16 MiB signed ``artifact`` frame cut into 256 KiB signed chunks,
  reassembled, verified (HMAC per chunk, SHA-256 and HMAC of the whole) at the receiver: MiB/s.
  Also one burst of ``--burst-mb`` (default 32 MiB) published fire-and-forget and one with
  ``publish_many`` (flow-controlled, as the agent pushes models), to show the
  transport's 100-message QoS 1 queue limit.
- ``fleet``: 100 inference-only :class:`Agent` objects (``--fleet-workers`` processes of
  in-process agents; LeNet portable artifact, http off, heartbeat 5 s) all online, then a
  gossip storm: every agent pushes ``--storm-frames`` signed LeNet frames (fp32, one chunk each)
  to 2 random peers, QoS 1. Inference-only agents drop gossip as ``not_learning``, counted in
  ``Agent.drop_counts()``: every frame delivered is exactly one such drop, so delivered frames
  are read from those counters (no extra subscriber adds broker fan-out). Then, unless
  ``--fleet-learn-rounds 0``, all 100 agents gossip-learn LeNet for that many rounds.

Output: one JSON object per line on stdout (also appended to ``--out``), then a summary.

    PYTHONPATH=. python benchmarks/agent_bench.py --part all --out runs/agent_bench.jsonl
    PYTHONPATH=. python benchmarks/agent_bench.py --part fleet --agents 100 --fleet-workers 4
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import os
import platform
import queue
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FLEET = "bench"
MB = 2**20
RESULTS: list[dict[str, Any]] = []
OUT_FILE: Path | None = None


# ----------------------------------------------------------------------------------- helpers
def emit(record: dict[str, Any]) -> dict[str, Any]:
    RESULTS.append(record)
    line = json.dumps(record, default=_jsonable)
    print(line, flush=True)
    if OUT_FILE is not None:
        with open(OUT_FILE, "a") as handle:
            handle.write(line + "\n")
    return record


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile (MiB) and Threads of a process, from /proc/PID/status."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key + "_mb"] = round(int(rest.split()[0]) / 1024, 1)
            elif key == "Threads":
                out["threads"] = int(rest.split()[0])
    return out


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def contention() -> dict[str, Any]:
    """Load average and other CPU-heavy processes (gossip simulations) running right now."""
    import psutil

    busy = []
    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "cmdline", "ppid"]) if p.pid != me]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(0.5)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            cpu = p.cpu_percent(None)
            if cpu >= 20:
                cmd = " ".join(p.info["cmdline"] or [])[:90]
                busy.append({"pid": p.pid, "cpu_percent": round(cpu), "cmd": cmd})
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "busy_processes": busy}


class Env:
    """Work directory with the fleet key, artifacts and data (reused between runs)."""

    def __init__(self, workdir: Path) -> None:
        self.work = workdir
        self.work.mkdir(parents=True, exist_ok=True)
        self.key = self.work / "fleet.key"
        if not self.key.exists():
            self.key.write_bytes(os.urandom(32))

    def artifact(self, kind: str) -> Path:
        out = self.work / "art" / kind
        if (out / "manifest.json").exists():
            return out
        code = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import torch, models, exporters
torch.manual_seed(0)
kind = {kind!r}
if kind == "lenet-portable":
    m, fmt, shape, name = models.create("lenet5"), "onnx-portable", (1, 32, 32), "digits"
elif kind == "bireal-w0125-fast":
    m = models.create("bireal18", stem="imagenet", width=0.125, in_channels=1)
    fmt, shape, name = "onnx", (1, 32, 32), "bireal-w0125"
elif kind == "bireal-w0125-portable":
    m = models.create("bireal18", stem="imagenet", width=0.125, in_channels=1)
    fmt, shape, name = "onnx-portable", (1, 32, 32), "bireal-w0125"
elif kind == "bireal-full-fast":
    m = models.create("bireal18", stem="imagenet", num_classes=1000)
    fmt, shape, name = "onnx", (3, 224, 224), "bireal18"
else:
    raise SystemExit("unknown artifact " + kind)
exporters.export(m.eval(), {str(out)!r}, fmt, name=name, version="1", input_shape=shape,
                 overwrite=True)
"""
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True, env=child_env(), cwd=ROOT)
        print(f"# exported {kind} in {time.monotonic() - start:.1f} s", file=sys.stderr)
        return out

    def digits_dir(self) -> Path:
        out = self.work / "data" / "digits"
        if (out / "test.safetensors").exists():
            return out
        out.mkdir(parents=True, exist_ok=True)
        from safetensors.numpy import save_file

        from toolkit.data import load_dataset

        for split in ("train", "test"):
            ds = load_dataset("digits", split)
            save_file({"x": ds.x, "y": ds.y}, str(out / f"{split}.safetensors"))
        return out

    def shard_dirs(self, n: int) -> list[Path]:
        """``n`` IID shards of the digits training split, each with the whole test split."""
        root = self.work / "data" / f"shards{n}"
        dirs = [root / f"{i:03d}" for i in range(n)]
        if all((d / "test.safetensors").exists() for d in dirs):
            return dirs
        import numpy as np
        from safetensors.numpy import save_file

        from toolkit.data import load_dataset

        train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
        order = np.random.default_rng(0).permutation(len(train.y))
        for i, folder in enumerate(dirs):
            folder.mkdir(parents=True, exist_ok=True)
            index = order[i::n]
            save_file(
                {"x": np.ascontiguousarray(train.x[index]), "y": train.y[index]},
                str(folder / "train.safetensors"),
            )
            save_file({"x": test.x, "y": test.y}, str(folder / "test.safetensors"))
        return dirs


def mosquitto(nodelay: bool = True):
    """Mosquitto as the tests start it (``set_tcp_nodelay true``); ``nodelay=False`` undoes it."""
    from edge_agent.broker import MosquittoBroker

    return MosquittoBroker(extra_config="" if nodelay else "set_tcp_nodelay false").start()


# -------------------------------------------------------------------------- part 1: RSS
_IMPORT_PROBES = {
    "python (nothing imported)": "",
    "numpy": "import numpy",
    "numpy + onnxruntime + paho": "import numpy, onnxruntime, paho.mqtt.client",
    "numpy + onnxruntime + paho + psutil": "import numpy, onnxruntime, paho.mqtt.client, psutil",
    "numpy + onnxruntime + paho + numba": "import numpy, onnxruntime, paho.mqtt.client, numba",
    "edge_agent.daemon + edge_agent.agent (what the daemon imports)": (
        "import edge_agent.daemon, edge_agent.agent, psutil"
    ),
    "edge_agent.cli (typer, click, pydantic: the CLI, left behind by the exec)": (
        "import edge_agent.cli, typer._adapters"
    ),
}


def python_output(*args: str) -> str:
    """stdout of ``python ARGS`` run from the repository (imports resolve to this checkout)."""
    return subprocess.run(
        [sys.executable, *args],
        check=True,
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=ROOT,
    ).stdout


def import_rss(stmt: str) -> dict[str, Any]:
    """Memory of a fresh interpreter after running ``stmt`` (an import), from /proc."""
    code = (
        f"{stmt}\nimport json, sys\n"
        "f = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
        "g = lambda k: round(int(f[k].split()[0]) / 1024, 1)\n"
        "print(json.dumps({'VmRSS_mb': g('VmRSS'), 'VmHWM_mb': g('VmHWM'), "
        "'RssAnon_mb': g('RssAnon'), 'RssFile_mb': g('RssFile'), "
        "'threads': int(f['Threads']), 'torch_loaded': 'torch' in sys.modules}))"
    )
    return json.loads(python_output("-c", code))


def import_baselines() -> None:
    for label, stmt in _IMPORT_PROBES.items():
        emit({"part": "rss", "what": "import-only", "label": label, **import_rss(stmt)})


_STAGE_PROBE = r"""
import sys, json
def rss(label):
    f = dict(l.split(':', 1) for l in open('/proc/self/status'))
    g = lambda k: round(int(f[k].split()[0]) / 1024, 1)
    print(json.dumps({"stage": label, "VmRSS_mb": g("VmRSS"), "RssAnon_mb": g("RssAnon"),
                      "RssFile_mb": g("RssFile"), "threads": int(f["Threads"])}))
rss("python, nothing imported")
import edge_agent.daemon; rss("+ edge_agent.daemon (after the CLI's exec)")
import edge_agent.agent; rss("+ edge_agent.agent (numpy, paho, protocol)")
import onnxruntime; rss("+ onnxruntime")
import numpy as np
from exporters import runtime
p = runtime.load(sys.argv[1], threads=1); rss("+ runtime.load(LeNet portable)")
p.predict(np.zeros((2, 1, 32, 32), np.float32)); rss("+ health-check predict")
import psutil; psutil.Process().memory_info(); rss("+ psutil (telemetry)")
"""


def daemon_stages(env: Env) -> None:
    """RSS after each thing the serving daemon loads, in one process (no broker, no threads)."""
    out = python_output("-c", _STAGE_PROBE, str(env.artifact("lenet-portable")))
    for line in out.splitlines():
        emit({"part": "rss", "what": "daemon stages", **json.loads(line)})


def spawn_daemon(
    env: Env, url: str, device: str, artifact: Path, *extra: str, env_extra: dict | None = None
) -> tuple[subprocess.Popen, Path]:
    state = env.work / "state" / device
    shutil.rmtree(state, ignore_errors=True)
    log = env.work / f"{device}.log"
    args = [
        sys.executable,
        "-m",
        "edge_agent.cli",
        "run",
        "--broker",
        url,
        "--fleet",
        FLEET,
        "--id",
        device,
        "--state-dir",
        str(state),
        "--artifact",
        str(artifact),
        "--key-file",
        str(env.key),
        "--http-port",
        "0",
        "--heartbeat-s",
        "1",
        *extra,
    ]
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            args,
            env=child_env(**(env_extra or {})),
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    return proc, log


def stop_daemon(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    return proc.returncode


def _online(device: str):
    return lambda d: d.get(device, {}).get("status") == "online"


def serving_rss(
    env: Env, kind: str, shape: tuple[int, ...], requests: int = 20, env_extra: dict | None = None
) -> None:
    import numpy as np

    from toolkit.fleet import FleetClient

    artifact = env.artifact(kind)
    device = f"rss-{kind}"
    batch = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    broker = mosquitto()
    try:
        with FleetClient(broker.url, fleet=FLEET, key_file=env.key) as fleet:
            start = time.monotonic()
            proc, log = spawn_daemon(env, broker.url, device, artifact, env_extra=env_extra)
            try:
                if not fleet.wait_for(_online(device), timeout=120):
                    raise RuntimeError(f"{device} not online; log:\n{log.read_text()[-2000:]}")
                online_s = time.monotonic() - start
                idle = proc_status(proc.pid)
                note = None
                fleet.infer(device, batch, timeout=60)  # warm-up
                rtts, agent_ms = [], []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    reply = fleet.infer(device, batch, timeout=60)
                    rtts.append((time.perf_counter() - t0) * 1000)
                    if not reply.get("ok"):
                        raise RuntimeError(f"inference failed: {reply}")
                    agent_ms.append(reply["result"]["latency_ms"])
                mem = proc_status(proc.pid)
                status = fleet.command(device, "status", timeout=30)["result"]
                tel = status["telemetry"]
            finally:
                code = stop_daemon(proc)
        emit(
            {
                "part": "rss",
                "what": "serving-only daemon",
                "artifact": kind,
                "env": env_extra or {},
                "format": json.loads((artifact / "manifest.json").read_text())["format"],
                "input_shape": list(shape),
                "artifact_mb": round(sum(f.stat().st_size for f in artifact.iterdir()) / MB, 2),
                "online_after_s": round(online_s, 2),
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
                "exit_code": code,
                "target_rss_mb": 80,
                "target_met": mem["VmRSS_mb"] <= 80 and not tel["torch_loaded"],
                "note": note,
            }
        )
    finally:
        broker.stop()


def part_rss(env: Env, args: argparse.Namespace) -> None:
    import_baselines()
    daemon_stages(env)
    serving_rss(env, "lenet-portable", (1, 32, 32))
    # glibc's malloc arenas: one per thread by default; an environment knob, no code change
    serving_rss(env, "lenet-portable", (1, 32, 32), env_extra={"MALLOC_ARENA_MAX": "2"})
    serving_rss(env, "bireal-w0125-portable", (1, 32, 32))
    serving_rss(env, "bireal-w0125-fast", (1, 32, 32))
    if args.full_width:
        serving_rss(env, "bireal-full-fast", (3, 224, 224))


# --------------------------------------------------------------------- part 2: learning RSS
def part_learn_rss(env: Env, args: argparse.Namespace) -> None:
    import numpy as np

    from toolkit.fleet import FleetClient

    for label, stmt in (
        ("torch", "import torch"),
        ("edge_agent.learner (torch, models, merge)", "import edge_agent.learner"),
    ):
        emit({"part": "learn-rss", "what": "import-only", "label": label, **import_rss(stmt)})
    artifact = env.artifact("lenet-portable")
    data = env.digits_dir()
    device = "rss-learner"
    broker = mosquitto()
    try:
        with FleetClient(broker.url, fleet=FLEET, key_file=env.key) as fleet:
            start = time.monotonic()
            proc, log = spawn_daemon(
                env,
                broker.url,
                device,
                artifact,
                "--learn",
                "--data-dir",
                str(data),
                env_extra={"OMP_NUM_THREADS": str(args.learn_threads)}
                if args.learn_threads
                else None,
            )
            try:
                if not fleet.wait_for(_online(device), timeout=120):
                    raise RuntimeError(f"{device} not online; log:\n{log.read_text()[-2000:]}")
                rounds_seen, tel, first_round_s = 0, {}, None
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    tel = fleet.command(device, "status", timeout=30)["result"]["telemetry"]
                    rounds_seen = tel["learning"]["round"] or 0
                    if rounds_seen >= 1 and first_round_s is None:
                        first_round_s = time.monotonic() - start
                    if rounds_seen >= args.learn_rounds or tel["learning"]["error"]:
                        break
                    time.sleep(0.5)
                mem = proc_status(proc.pid)
                batch = np.random.default_rng(0).standard_normal((1, 1, 32, 32), np.float32)
                rtts = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    assert fleet.infer(device, batch, timeout=60)["ok"]
                    rtts.append((time.perf_counter() - t0) * 1000)
                mem_after = proc_status(proc.pid)
            finally:
                code = stop_daemon(proc)
        emit(
            {
                "part": "learn-rss",
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
                "exit_code": code,
            }
        )
    finally:
        broker.stop()


# ------------------------------------------------------------------ parts 3-4: the receiver
def worker_receiver(args: argparse.Namespace) -> int:
    """A separate process that opens frames the way the agent does and acks when done."""
    from edge_agent.protocol import FrameRejected, FrameVerifier, Keyring
    from edge_agent.transport import MqttTransport

    keyring = Keyring.from_file(args.key)
    verifier = FrameVerifier(keyring)
    expected = {
        model: {k: (tuple(v), "float32") for k, v in shapes.items()}
        for model, shapes in json.loads(Path(args.expected).read_text()).items()
    }
    rx = MqttTransport(url=args.broker, client_id="bench-rx", tcp_nodelay=args.nodelay)

    def ack(body: dict[str, Any]) -> None:
        rx.publish(args.ack_topic, json.dumps(body).encode(), qos=1)

    def on_message(topic: str, payload: bytes) -> None:
        try:
            frame = verifier.receive(payload)
            if frame is None:
                return
            if frame.type == "gossip":
                _, tensors = verifier.open_tensors(frame, expected[frame.header["model"]])
                nbytes = sum(t.nbytes for t in tensors.values())
            elif frame.type == "artifact":
                if hashlib.sha256(frame.body).hexdigest() != frame.header["sha256"]:
                    raise FrameRejected("malformed", "artifact sha256 mismatch")
                nbytes = len(frame.body)
            else:
                return
        except FrameRejected as err:
            ack({"error": str(err), "t_done": time.monotonic()})
            return
        ack({"seq": frame.header.get("seq"), "t_done": time.monotonic(), "bytes": nbytes})

    rx.subscribe(args.topic, on_message, qos=1)
    rx.connect(timeout=10)
    rx.wait_subscribed(10)
    print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
    sys.stdin.read()  # until the parent closes the pipe
    print(json.dumps({"event": "drops", "drops": verifier.drops.snapshot()}), flush=True)
    rx.close()
    return 0


class Link:
    """Sender transport in this process + receiver process, through one Mosquitto."""

    def __init__(
        self, env: Env, expected: dict[str, dict[str, list[int]]], nodelay: bool = True
    ) -> None:
        from edge_agent.protocol import Keyring, Topics
        from edge_agent.transport import MqttTransport

        self.nodelay = nodelay
        self.broker = mosquitto(nodelay)
        self.keyring = Keyring.from_file(env.key)
        self.topic = Topics(FLEET).gossip("bench-rx")
        ack_topic = f"bitfleet/{FLEET}/bench/ack"
        spec = env.work / "expected.json"
        spec.write_text(json.dumps(expected))
        self.rx = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                "receiver",
                "--broker",
                self.broker.url,
                "--key",
                str(env.key),
                "--topic",
                self.topic,
                "--ack-topic",
                ack_topic,
                "--expected",
                str(spec),
                *(["--nodelay"] if nodelay else []),
            ],
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        ready = json.loads(self.rx.stdout.readline())
        assert ready["event"] == "ready", ready
        self.acks: queue.Queue[dict[str, Any]] = queue.Queue()
        self.tx = MqttTransport(url=self.broker.url, client_id="bench-tx", tcp_nodelay=nodelay)
        self.tx.subscribe(ack_topic, lambda _t, p: self.acks.put(json.loads(p)), qos=1)
        self.tx.connect(timeout=10)
        self.tx.wait_subscribed(10)

    def send(self, chunks: list[bytes], timeout: float = 60.0) -> tuple[float, dict[str, Any]]:
        """Publish chunks QoS 1; (monotonic time of the first publish, the receiver's ack)."""
        t_first = time.monotonic()
        for chunk in chunks:
            self.tx.publish(self.topic, chunk, qos=1)
        return t_first, self.acks.get(timeout=timeout)

    def close(self) -> dict[str, int]:
        self.tx.close()
        self.rx.stdin.close()
        drops = json.loads(self.rx.stdout.readline() or "{}").get("drops", {})
        self.rx.wait(timeout=10)
        self.broker.stop()
        return drops


def _model(total_bytes: int, n_tensors: int = 4) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    per = total_bytes // 4 // n_tensors
    return {
        f"layer{i}.weight": rng.standard_normal(per).astype(np.float32) for i in range(n_tensors)
    }


def part_latency(env: Env, args: argparse.Namespace) -> None:

    for nodelay in [False, True] if args.nodelay_variant else [True]:
        _latency(env, args, nodelay)


def _latency(env: Env, args: argparse.Namespace, nodelay: bool) -> None:
    from edge_agent.protocol import seal_tensors, split_chunks

    cases = {"1MiB": _model(MB), "1KiB": _model(1024, 1)}
    expected = {k: {n: list(t.shape) for n, t in v.items()} for k, v in cases.items()}
    link = Link(env, expected, nodelay)
    try:
        for model, tensors in cases.items():
            publish_ms, total_ms, seal_ms, n_chunks = [], [], [], 0
            for i in range(args.warmup + args.repeats):
                t0 = time.monotonic()
                frame = seal_tensors(
                    tensors,
                    codec="fp32",
                    sender="bench-tx",
                    keyring=link.keyring,
                    extra={"seq": i, "model": model, "round": i, "samples": 1},
                )
                chunks = split_chunks(
                    frame, chunk_bytes=args.chunk_bytes, sender="bench-tx", keyring=link.keyring
                )
                t1, ack = link.send(chunks)
                if ack.get("seq") != i:
                    raise RuntimeError(f"receiver answered {ack} for transfer {i}")
                if i >= args.warmup:
                    seal_ms.append((t1 - t0) * 1000)
                    publish_ms.append((ack["t_done"] - t1) * 1000)
                    total_ms.append((ack["t_done"] - t0) * 1000)
                n_chunks, frame_bytes = len(chunks), len(frame)
            emit(
                {
                    "part": "latency",
                    "tcp": TCP_LABEL[nodelay],
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
    finally:
        drops = link.close()
    emit(
        {
            "part": "latency",
            "tcp": TCP_LABEL[nodelay],
            "what": "receiver drops",
            "drops": {k: v for k, v in drops.items() if v},
        }
    )


TCP_LABEL = {
    False: "Nagle on (before the fix)",
    True: "as shipped: TCP_NODELAY on broker + clients",
}


def _burst(link: Link, args: argparse.Namespace, method: str) -> dict[str, Any]:
    """One frame of more chunks than the transport's QoS 1 queue (``max_queued`` = 100, in
    flight included): ``publish`` fire-and-forget (what ``Agent._push`` did before), or
    ``publish_many`` (flow-controlled, what it does now)."""
    from edge_agent.protocol import seal_binary, split_chunks

    size = int(args.burst_mb * MB)
    data = os.urandom(size)
    seq = -1 if method == "publish" else -2
    frame = seal_binary(
        "artifact",
        {
            "name": "burst",
            "version": method,
            "seq": seq,
            "sha256": hashlib.sha256(data).hexdigest(),
        },
        data,
        sender="bench-tx",
        keyring=link.keyring,
    )
    chunks = split_chunks(
        frame, chunk_bytes=args.chunk_bytes, sender="bench-tx", keyring=link.keyring
    )
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
        "part": "throughput",
        "what": f"burst via {method}",
        "payload_mib": args.burst_mb,
        "chunks": len(chunks),
        "dropped_publishes": link.tx.dropped_publishes - before,
        "completed": completed,
        "mib_per_s": round(args.burst_mb / seconds, 1) if seconds else None,
    }


def part_throughput(env: Env, args: argparse.Namespace) -> None:
    for nodelay in [False, True] if args.nodelay_variant else [True]:
        _throughput(env, args, nodelay)


def _throughput(env: Env, args: argparse.Namespace, nodelay: bool) -> None:
    from edge_agent.protocol import seal_binary, split_chunks

    link = Link(env, {}, nodelay)
    try:
        size = int(args.payload_mb * MB)
        data = os.urandom(size)
        digest = hashlib.sha256(data).hexdigest()
        rates, rates_incl, seal_ms = [], [], []
        for i in range(1 + args.throughput_repeats):
            t0 = time.monotonic()
            frame = seal_binary(
                "artifact",
                {"name": "bench", "version": str(i), "sha256": digest, "seq": i},
                data,
                sender="bench-tx",
                keyring=link.keyring,
            )
            chunks = split_chunks(
                frame, chunk_bytes=args.chunk_bytes, sender="bench-tx", keyring=link.keyring
            )
            t1, ack = link.send(chunks)
            if ack.get("seq") != i:
                raise RuntimeError(f"receiver answered {ack} for transfer {i}")
            if i >= 1:  # first is warm-up
                rates.append(size / MB / (ack["t_done"] - t1))
                rates_incl.append(size / MB / (ack["t_done"] - t0))
                seal_ms.append((t1 - t0) * 1000)
        emit(
            {
                "part": "throughput",
                "tcp": TCP_LABEL[nodelay],
                "payload_mib": args.payload_mb,
                "chunks": len(chunks),
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
        if args.burst_mb and nodelay:
            for method in ("publish", "publish_many"):
                emit(_burst(link, args, method))
    finally:
        drops = link.close()
    emit(
        {
            "part": "throughput",
            "tcp": TCP_LABEL[nodelay],
            "what": "receiver drops",
            "drops": {k: v for k, v in drops.items() if v},
        }
    )


# ----------------------------------------------------------------------- part 5: the fleet
def worker_fleet(args: argparse.Namespace) -> int:
    """``count`` in-process agents; obeys JSON commands on stdin, answers on stdout."""
    import logging

    from safetensors.numpy import load_file

    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig
    from edge_agent.protocol import seal_tensors, split_chunks

    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ids = [f"a{i:03d}" for i in range(args.first, args.first + args.count)]
    all_ids = [f"a{i:03d}" for i in range(args.total)]
    shards = json.loads(args.shards) if args.shards else {}
    last_gossip = [0.0]
    agents: list[Agent] = []
    for device in ids:
        config = AgentConfig(
            broker=args.broker,
            fleet=FLEET,
            id=device,
            state_dir=str(Path(args.work) / "fleet-state" / device),
            artifact=args.artifact,
            key_file=args.key,
            http_port=0,
            heartbeat_s=5.0,
            data_dir=shards.get(device, ""),
        )
        shutil.rmtree(config.state_dir, ignore_errors=True)
        agent = Agent(config)
        agent.start(connect_timeout=60)
        # Same handler, plus the arrival time of the last gossip message (for the duration).
        handler = agent._on_gossip

        def timed(topic: str, payload: bytes, handler=handler) -> None:
            handler(topic, payload)
            last_gossip[0] = time.monotonic()

        agent.transport.subscribe(agent.topics.gossip(device), timed)
        agents.append(agent)
    for agent in agents:
        agent.transport.wait_subscribed(30)
    tensors = {k: v for k, v in load_file(args.tensors).items()}

    def say(body: dict[str, Any]) -> None:
        print(json.dumps(body, default=_jsonable), flush=True)

    say({"event": "ready", "pid": os.getpid(), **proc_status(os.getpid())})
    for line in sys.stdin:
        cmd = json.loads(line)
        name = cmd["cmd"]
        if name == "storm":
            rng = random.Random(cmd["seed"] * 1000 + args.first)
            expected: collections.Counter[str] = collections.Counter()
            dropped0 = sum(a.transport.dropped_publishes for a in agents)
            t0 = time.monotonic()
            sent = messages = 0
            for n in range(cmd["frames"]):
                for agent in agents:
                    me = agent.config.id
                    peers = rng.sample([d for d in all_ids if d != me], cmd["peers"])
                    frame = seal_tensors(
                        tensors,
                        codec="fp32",
                        sender=me,
                        keyring=agent.keyring,
                        extra={"round": n, "samples": 1, "model": "lenet5"},
                    )
                    chunks = split_chunks(
                        frame,
                        chunk_bytes=agent.config.chunk_bytes,
                        sender=me,
                        keyring=agent.keyring,
                    )
                    for peer in peers:
                        for chunk in chunks:
                            agent.transport.publish(agent.topics.gossip(peer), chunk, qos=1)
                            messages += 1
                        expected[peer] += 1
                        sent += 1
            t_published = time.monotonic()
            deadline = t_published + 120
            while time.monotonic() < deadline and any(
                len(getattr(a.transport._client, "_out_messages", ())) for a in agents
            ):
                time.sleep(0.005)
            say(
                {
                    "event": "sent",
                    "frames": sent,
                    "messages": messages,
                    "chunks_per_frame": len(chunks),
                    "frame_bytes": len(frame),
                    "expected": dict(expected),
                    "t0": t0,
                    "publish_loop_s": t_published - t0,
                    "acked_s": time.monotonic() - t0,
                    "dropped_publishes": sum(a.transport.dropped_publishes for a in agents)
                    - dropped0,
                }
            )
        elif name == "counts":
            say(
                {
                    "event": "counts",
                    "last_gossip": last_gossip[0],
                    "drops": {a.config.id: a.drop_counts() for a in agents},
                    "handler_errors": sum(a.transport.handler_errors for a in agents),
                    "connects": sum(a.transport.connect_count for a in agents),
                    **proc_status(os.getpid()),
                }
            )
        elif name == "learnstatus":
            rows = {}
            for a in agents:
                lr = a.learner
                rows[a.config.id] = {
                    "on": a.learning,
                    "round": lr.round if lr else None,
                    "merges": lr.merges if lr else None,
                    "initial": lr.initial_accuracy if lr else None,
                    "accuracy": lr.metrics.get("accuracy") if lr else None,
                    "error": a._learn_error,
                }
            say(
                {
                    "event": "learnstatus",
                    "agents": rows,
                    "torch_loaded": "torch" in sys.modules,
                    **proc_status(os.getpid()),
                }
            )
        elif name == "stop":
            t0 = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda a: a.shutdown(), agents))
            say({"event": "stopped", "shutdown_s": time.monotonic() - t0})
            break
    return 0


def _cpu(proc) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def part_fleet(env: Env, args: argparse.Namespace) -> None:
    import numpy as np
    import psutil
    from safetensors.numpy import save_file

    import models
    from toolkit.fleet import FleetClient

    artifact = env.artifact("lenet-portable")
    tensors_file = env.work / "lenet_state.safetensors"
    save_file(
        {k: v.detach().numpy().copy() for k, v in models.create("lenet5").state_dict().items()},
        str(tensors_file),
    )
    n, k = args.agents, args.fleet_workers
    shards = env.shard_dirs(n) if args.fleet_learn_rounds else []
    broker = mosquitto()
    mosq = psutil.Process(broker.pid)
    workers: list[subprocess.Popen] = []
    logs = []
    try:
        t_start = time.monotonic()
        per = -(-n // k)
        for w in range(k):
            first, count = w * per, min(per, n - w * per)
            if count <= 0:
                break
            shard_map = (
                {f"a{i:03d}": str(shards[i]) for i in range(first, first + count)} if shards else {}
            )
            log = open(env.work / f"fleet-worker{w}.log", "wb")
            logs.append(log)
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--worker",
                        "fleet",
                        "--broker",
                        broker.url,
                        "--key",
                        str(env.key),
                        "--artifact",
                        str(artifact),
                        "--work",
                        str(env.work),
                        "--first",
                        str(first),
                        "--count",
                        str(count),
                        "--total",
                        str(n),
                        "--tensors",
                        str(tensors_file),
                        "--shards",
                        json.dumps(shard_map),
                    ],
                    env=child_env(OMP_NUM_THREADS="1"),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    cwd=ROOT,
                )
            )

        def ask(body: dict[str, Any]) -> list[dict[str, Any]]:
            for w in workers:
                w.stdin.write(json.dumps(body) + "\n")
                w.stdin.flush()
            return [json.loads(w.stdout.readline()) for w in workers]

        ready = [json.loads(w.stdout.readline()) for w in workers]
        if any(r.get("event") != "ready" for r in ready):
            raise RuntimeError(f"workers failed to start: {ready}")
        procs = [psutil.Process(w.pid) for w in workers]
        with FleetClient(broker.url, fleet=FLEET, key_file=env.key) as fleet:
            ids = [f"a{i:03d}" for i in range(n)]
            all_online = fleet.wait_for(
                lambda d: sum(d.get(i, {}).get("status") == "online" for i in ids) == n,
                timeout=120,
            )
            online_s = time.monotonic() - t_start
            online = sum(fleet.devices().get(i, {}).get("status") == "online" for i in ids)
            time.sleep(2.0)  # let start-up settle before the CPU window opens
            idle0 = (time.monotonic(), _cpu(mosq), [_cpu(p) for p in procs])
            time.sleep(5.0)
            idle1 = (time.monotonic(), _cpu(mosq), [_cpu(p) for p in procs])
            idle_wall = idle1[0] - idle0[0]
            emit(
                {
                    "part": "fleet",
                    "what": f"{n} agents online",
                    "agents": n,
                    "worker_processes": len(workers),
                    "online_retained_states": online,
                    "all_online": all_online,
                    "online_after_s": round(online_s, 1),
                    "workers": [{"pid": r["pid"], **proc_status(r["pid"])} for r in ready],
                    "mosquitto": {"pid": broker.pid, **proc_status(broker.pid)},
                    "idle_cpu_percent": {
                        "mosquitto": round(100 * (idle1[1] - idle0[1]) / idle_wall, 1),
                        "agents_total": round(100 * (sum(idle1[2]) - sum(idle0[2])) / idle_wall, 1),
                    },
                }
            )

            # ---- gossip storm
            before = ask({"cmd": "counts"})
            nl_before = sum(d.get("not_learning", 0) for b in before for d in b["drops"].values())
            cpu0 = (_cpu(mosq), [_cpu(p) for p in procs])
            t_go = time.monotonic()
            sent = ask({"cmd": "storm", "frames": args.storm_frames, "peers": 2, "seed": 0})
            expected: collections.Counter[str] = collections.Counter()
            for s in sent:
                expected.update(s["expected"])
            total_expected = sum(expected.values())
            deadline = time.monotonic() + args.storm_timeout
            stable_since, last_total, counts = time.monotonic(), -1, before
            while time.monotonic() < deadline:
                counts = ask({"cmd": "counts"})
                got = sum(d.get("not_learning", 0) for c in counts for d in c["drops"].values())
                got -= nl_before
                if got != last_total:
                    last_total, stable_since = got, time.monotonic()
                if got >= total_expected or time.monotonic() - stable_since > 10:
                    break
                time.sleep(0.2)
            t_end = time.monotonic()
            cpu1 = (_cpu(mosq), [_cpu(p) for p in procs])
            last = max(c["last_gossip"] for c in counts)
            per_agent = {aid: d for c in counts for aid, d in c["drops"].items()}
            per_before = {aid: d for c in before for aid, d in c["drops"].items()}
            lost = extra = 0
            other: collections.Counter[str] = collections.Counter()
            for aid, drops in per_agent.items():
                got = drops.get("not_learning", 0) - per_before[aid].get("not_learning", 0)
                lost += max(0, expected.get(aid, 0) - got)
                extra += max(0, got - expected.get(aid, 0))
                for reason, value in drops.items():
                    delta = value - per_before[aid].get(reason, 0)
                    if reason != "not_learning" and delta:
                        other[reason] += delta
            wall = t_end - t_go
            frame_bytes = sent[0]["frame_bytes"]
            duration = last - t_go
            emit(
                {
                    "part": "fleet",
                    "what": "gossip storm",
                    "agents": n,
                    "frames_per_agent": args.storm_frames,
                    "peers_per_frame": 2,
                    "frame_bytes": frame_bytes,
                    "chunks_per_frame": sent[0]["chunks_per_frame"],
                    "frames_sent": sum(s["frames"] for s in sent),
                    "frames_delivered": last_total,
                    "frames_lost": lost,
                    "unexpected_extra": extra,
                    "other_drops": dict(other),
                    "sender_dropped_publishes": sum(s["dropped_publishes"] for s in sent),
                    "handler_errors": sum(c["handler_errors"] for c in counts),
                    "reconnects": sum(c["connects"] for c in counts) - n,
                    "duration_s": round(duration, 2),
                    "publish_loop_s_max": round(max(s["publish_loop_s"] for s in sent), 2),
                    "all_acked_s_max": round(max(s["acked_s"] for s in sent), 2),
                    "frames_per_s": round(last_total / duration, 1) if duration > 0 else None,
                    "mib_per_s_into_broker": round(last_total * frame_bytes / MB / duration, 1)
                    if duration > 0
                    else None,
                    "cpu_window_s": round(wall, 2),
                    "mosquitto_cpu_percent": round(100 * (cpu1[0] - cpu0[0]) / wall, 1),
                    "mosquitto_cpu_s": round(cpu1[0] - cpu0[0], 2),
                    "agents_cpu_percent_total": round(
                        100 * (sum(cpu1[1]) - sum(cpu0[1])) / wall, 1
                    ),
                    "agents_cpu_s": round(sum(cpu1[1]) - sum(cpu0[1]), 2),
                    "workers_after": [
                        {k2: c[k2] for k2 in ("VmRSS_mb", "VmHWM_mb", "threads")} for c in counts
                    ],
                    "mosquitto_after": proc_status(broker.pid),
                    "target_met": lost == 0,
                }
            )

            # ---- everyone learns
            if args.fleet_learn_rounds:
                rounds = args.fleet_learn_rounds
                overrides = {
                    "rounds": rounds,
                    "local_steps": args.fleet_local_steps,
                    "round_interval_s": args.fleet_round_interval,
                    "peers": 2,
                }
                before_drops = ask({"cmd": "counts"})
                cpu0 = (_cpu(mosq), [_cpu(p) for p in procs])
                t_go = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(25) as pool:
                    replies = list(
                        pool.map(
                            lambda d: fleet.command(d, "learn.start", overrides, timeout=300), ids
                        )
                    )
                started = sum(bool(r.get("ok")) for r in replies)
                errors = [r.get("error") for r in replies if not r.get("ok")][:3]
                t_started = time.monotonic()
                deadline = t_go + args.fleet_learn_timeout
                status = []
                while time.monotonic() < deadline:
                    status = ask({"cmd": "learnstatus"})
                    rows = [r for s in status for r in s["agents"].values()]
                    if all(not r["on"] for r in rows):
                        break
                    time.sleep(1.0)
                t_end = time.monotonic()
                cpu1 = (_cpu(mosq), [_cpu(p) for p in procs])
                after_drops = ask({"cmd": "counts"})
                rows = [r for s in status for r in s["agents"].values()]
                drops: collections.Counter[str] = collections.Counter()
                b_map = {aid: d for c in before_drops for aid, d in c["drops"].items()}
                for c in after_drops:
                    for aid, d in c["drops"].items():
                        for reason, value in d.items():
                            if value - b_map[aid].get(reason, 0):
                                drops[reason] += value - b_map[aid].get(reason, 0)
                wall = t_end - t_go
                done = [r for r in rows if r["round"] is not None]
                emit(
                    {
                        "part": "fleet",
                        "what": f"{n} agents gossip-learning LeNet-5",
                        "agents": n,
                        "learn_started": started,
                        "start_errors": errors,
                        "settings": overrides,
                        "commands_answered_s": round(t_started - t_go, 1),
                        "wall_s": round(wall, 1),
                        "rounds_min": min((r["round"] for r in done), default=None),
                        "rounds_max": max((r["round"] for r in done), default=None),
                        "merges_total": sum(r["merges"] or 0 for r in done),
                        "agents_with_merges": sum(bool(r["merges"]) for r in done),
                        "accuracy_initial_mean": round(
                            float(np.mean([r["initial"] for r in done])), 4
                        )
                        if done
                        else None,
                        "accuracy_final_mean": round(
                            float(
                                np.mean([r["accuracy"] for r in done if r["accuracy"] is not None])
                            ),
                            4,
                        )
                        if done
                        else None,
                        "learn_errors": [r["error"] for r in rows if r["error"]][:3],
                        "drops": dict(drops),
                        "mosquitto_cpu_percent": round(100 * (cpu1[0] - cpu0[0]) / wall, 1),
                        "agents_cpu_percent_total": round(
                            100 * (sum(cpu1[1]) - sum(cpu0[1])) / wall, 1
                        ),
                        "workers_after": [
                            {
                                k2: s[k2]
                                for k2 in ("VmRSS_mb", "VmHWM_mb", "threads", "torch_loaded")
                            }
                            for s in status
                        ],
                    }
                )
        stopped = ask({"cmd": "stop"})
        emit(
            {
                "part": "fleet",
                "what": "shutdown",
                "shutdown_s_max": round(max(s.get("shutdown_s", 0) for s in stopped), 1),
            }
        )
    finally:
        for w in workers:
            with contextlib.suppress(Exception):
                w.stdin.close()
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
        for log in logs:
            log.close()
        broker.stop()


# -------------------------------------------------------------------------------- summary
def summary() -> None:
    print("\n## summary")
    for r in RESULTS:
        part, what = r["part"], r.get("what", "")
        if part == "rss" and what == "import-only":
            print(f"rss  import-only  {r['label']:<60} VmRSS {r['VmRSS_mb']:6.1f} MB")
        elif part == "rss" and what == "daemon stages":
            print(f"rss  stages  {r['stage']:<60} VmRSS {r['VmRSS_mb']:6.1f} MB")
        elif part == "rss" and what == "serving-only daemon":
            m = r["after_requests"]
            env = " ".join(f"{k}={v}" for k, v in r["env"].items())
            label = r["artifact"] + (" " + env if env else "")
            shape = "x".join(map(str, r["input_shape"]))
            print(
                f"rss  daemon {label:<40} {shape:<9} VmRSS "
                f"{m['VmRSS_mb']:6.1f} MB  VmHWM {m['VmHWM_mb']:6.1f} MB  threads "
                f"{m['threads']}  torch_loaded={r['torch_loaded']}  <=80 MB: {r['target_met']}"
            )
        elif part == "learn-rss" and what == "import-only":
            print(f"learn-rss  import-only  {r['label']:<53} VmRSS {r['VmRSS_mb']:6.1f} MB")
        elif part == "learn-rss" and "after_rounds" in r:
            m = r["after_rounds"]
            print(
                f"learn-rss  rounds {r['rounds']}  VmRSS {m['VmRSS_mb']:.1f} MB  VmHWM "
                f"{m['VmHWM_mb']:.1f} MB  threads {m['threads']}  torch={r['torch_loaded']}"
            )
        elif part == "latency" and "model" in r:
            p = r["publish_to_decoded_ms"]
            print(
                f"latency  [{r['tcp']}] {r['model']:<5} {r['chunks']} chunk(s)  "
                f"publish->decoded p50 "
                f"{p['p50']} ms  p95 {p['p95']} ms  (seal+split p50 {r['seal_split_ms_p50']} ms)"
            )
        elif part == "throughput" and "mib_per_s_publish_to_verified" in r:
            print(
                f"throughput  [{r['tcp']}] {r['payload_mib']} MiB in {r['chunks']} chunks: "
                f"{r['mib_per_s_publish_to_verified']['median']} MiB/s publish->verified, "
                f"{r['mib_per_s_incl_seal_split']} MiB/s incl. seal+split"
            )
        elif part == "throughput" and what.startswith("burst via"):
            print(
                f"throughput  {what} {r['payload_mib']} MiB ({r['chunks']} chunks): dropped "
                f"{r['dropped_publishes']} publishes, completed={r['completed']}"
            )
        elif part == "fleet" and what == "gossip storm":
            print(
                f"fleet  storm: sent {r['frames_sent']} delivered {r['frames_delivered']} lost "
                f"{r['frames_lost']} in {r['duration_s']} s; mosquitto CPU "
                f"{r['mosquitto_cpu_percent']}%  agents CPU {r['agents_cpu_percent_total']}%"
            )
        elif part == "fleet" and "gossip-learning" in what:
            print(
                f"fleet  learning: {r['learn_started']} started, rounds {r['rounds_min']}-"
                f"{r['rounds_max']} in {r['wall_s']} s, merges {r['merges_total']}, accuracy "
                f"{r['accuracy_initial_mean']} -> {r['accuracy_final_mean']}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--part",
        default="all",
        choices=["all", "rss", "learn-rss", "latency", "throughput", "fleet"],
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bitfleet-agent-bench"))
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    ap.add_argument(
        "--no-full-width",
        dest="full_width",
        action="store_false",
        help="skip the full-width Bi-Real-18 at 3x224x224 in the rss part",
    )
    ap.add_argument("--learn-rounds", type=int, default=5)
    ap.add_argument(
        "--learn-threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS for the learning daemon (0: unset, torch's default)",
    )
    ap.add_argument("--chunk-bytes", type=int, default=256 * 1024)
    ap.add_argument(
        "--no-nodelay-variant",
        dest="nodelay_variant",
        action="store_false",
        help="latency/throughput: skip the TCP_NODELAY comparison run",
    )
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--payload-mb", type=float, default=16)
    ap.add_argument("--throughput-repeats", type=int, default=5)
    ap.add_argument("--burst-mb", type=float, default=32)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--fleet-workers", type=int, default=4)
    ap.add_argument("--storm-frames", type=int, default=10)
    ap.add_argument("--storm-timeout", type=float, default=180)
    ap.add_argument("--fleet-learn-rounds", type=int, default=10)
    ap.add_argument("--fleet-local-steps", type=int, default=10)
    ap.add_argument("--fleet-round-interval", type=float, default=0.5)
    ap.add_argument("--fleet-learn-timeout", type=float, default=300)
    # internal: child processes
    ap.add_argument("--worker", choices=["receiver", "fleet"], help=argparse.SUPPRESS)
    for flag in (
        "--broker",
        "--key",
        "--topic",
        "--ack-topic",
        "--expected",
        "--artifact",
        "--work",
        "--tensors",
        "--shards",
    ):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--nodelay", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--first", "--count", "--total"):
        ap.add_argument(flag, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "receiver":
        return worker_receiver(args)
    if args.worker == "fleet":
        return worker_fleet(args)

    global OUT_FILE
    OUT_FILE = args.out
    import numpy
    import onnxruntime
    import paho.mqtt

    env = Env(args.workdir)
    emit(
        {
            "part": "machine",
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "numpy": numpy.__version__,
            "onnxruntime": onnxruntime.__version__,
            "paho": paho.mqtt.__version__,
            "mosquitto": subprocess.run(
                ["mosquitto", "-h"], capture_output=True, text=True
            ).stdout.splitlines()[0],
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        }
    )
    parts = {
        "rss": part_rss,
        "learn-rss": part_learn_rss,
        "latency": part_latency,
        "throughput": part_throughput,
        "fleet": part_fleet,
    }
    chosen = list(parts) if args.part == "all" else [args.part]
    for name in chosen:
        emit({"part": name, "what": "contention at start", **contention()})
        start = time.monotonic()
        parts[name](env, args)
        emit({"part": name, "what": "done", "wall_s": round(time.monotonic() - start, 1)})
    summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
