"""What every agent benchmark shares: output records, the work directory, brokers, processes.

- Records: :func:`emit` prints one JSON object per line (and appends it to the ``--out`` file
  set with :func:`set_out`); :data:`RESULTS` keeps them for the summary.
- :class:`Env`: the work directory with the fleet key, exported artifacts and digits data,
  reused between runs.
- Processes: :func:`mosquitto` (a broker on a free loopback port), :func:`worker_argv`
  (``python -m benchmarks.agent.MODULE --worker NAME --flag value``), :func:`probe_argv` and
  :func:`import_baselines` (memory of a fresh interpreter, :mod:`.probes`),
  :func:`python_output`,
  :func:`running_daemon` (a real ``edge_agent.cli run`` subprocess, online, stopped after),
  :func:`proc_status`, :func:`cpu_seconds`, :func:`contention`.
- :class:`Link`: a sender in this process and a receiver process (:func:`worker_receiver`)
  that opens frames the way the agent does, through one Mosquitto (latency and throughput).

Workers of this module, started by the functions above::

    python -m benchmarks.agent.common --worker export --kind lenet-portable --out DIR
    python -m benchmarks.agent.common --worker receiver --broker URL --key FILE --topic T ...
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .probes import proc_status as proc_status  # re-exported: the one /proc reader

ROOT = Path(__file__).resolve().parents[2]
FLEET = "bench"
MB = 2**20
SENDER = "bench-tx"
RESULTS: list[dict[str, Any]] = []
_out_file: Path | None = None


# ------------------------------------------------------------------------------- records
def set_out(path: Path | None) -> None:
    """Also append every record emitted from now on to ``path`` (None: stdout only)."""
    global _out_file
    _out_file = path


def emit(record: dict[str, Any]) -> dict[str, Any]:
    """Print ``record`` as one JSON line (and append it to the ``--out`` file); keep it."""
    RESULTS.append(record)
    line = json.dumps(record, default=jsonable)
    print(line, flush=True)
    if _out_file is not None:
        with open(_out_file, "a") as handle:
            handle.write(line + "\n")
    return record


def jsonable(obj: Any) -> Any:
    """``json.dumps`` default: numpy scalars and paths."""
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# ----------------------------------------------------------------------------- processes
def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def worker_argv(module: str, worker: str, **flags: Any) -> list[str]:
    """``python -m benchmarks.agent.MODULE --worker WORKER --flag value ...``.

    A flag ``some_name=value`` becomes ``--some-name value``: strings and paths as they are,
    other values as JSON; ``True`` is a bare switch, ``False`` and ``None`` are left out.
    """
    argv = [sys.executable, "-m", f"benchmarks.agent.{module}", "--worker", worker]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value) if isinstance(value, str | Path) else json.dumps(value)]
    return argv


def python_output(argv: list[str]) -> str:
    """stdout of ``argv`` (a Python command) run from the repository, which must succeed."""
    return subprocess.run(
        argv, check=True, capture_output=True, text=True, env=child_env(), cwd=ROOT
    ).stdout


def probe_argv(worker: str, *args: str) -> list[str]:
    """``python benchmarks/agent/probes.py --worker WORKER ARGS``: a fresh interpreter.

    A script path, not ``-m``: runpy and the package's ``__init__`` would add ~0.2 MB to
    every memory figure of a bare interpreter.
    """
    return [sys.executable, str(Path(__file__).with_name("probes.py")), "--worker", worker, *args]


def import_baselines(part: str, probes: dict[str, list[str]]) -> None:
    """One ``import-only`` record of ``part`` per probe: label -> modules a fresh interpreter
    imports (:mod:`.probes`), then its memory from /proc."""
    for label, modules in probes.items():
        memory = json.loads(python_output(probe_argv("imports", *modules)))
        emit({"part": part, "what": "import-only", "label": label, **memory})


def cpu_seconds(proc: Any) -> float:
    """User + system CPU seconds of a ``psutil.Process``."""
    times = proc.cpu_times()
    return times.user + times.system


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


def mosquitto(nodelay: bool = True):
    """Mosquitto as the tests start it (``set_tcp_nodelay true``); ``nodelay=False`` undoes it."""
    from edge_agent.broker import MosquittoBroker

    return MosquittoBroker(extra_config="" if nodelay else "set_tcp_nodelay false").start()


# --------------------------------------------------------------------------- work folder
# kind: (architecture, its options, artifact flavour, input shape, artifact name)
_W0125 = {"stem": "imagenet", "width": 0.125, "in_channels": 1}
ARTIFACTS: dict[str, tuple[str, dict[str, Any], str, tuple[int, ...], str]] = {
    "lenet-portable": ("lenet5", {}, "onnx-portable", (1, 32, 32), "digits"),
    "bireal-w0125-fast": ("bireal18", _W0125, "onnx", (1, 32, 32), "bireal-w0125"),
    "bireal-w0125-portable": ("bireal18", _W0125, "onnx-portable", (1, 32, 32), "bireal-w0125"),
    "bireal-full-fast": (
        "bireal18",
        {"stem": "imagenet", "num_classes": 1000},
        "onnx",
        (3, 224, 224),
        "bireal18",
    ),
}


def export_artifact(kind: str, out: Path) -> None:
    """Export the model of ``kind`` (seed 0) as an artifact folder ``out`` (imports torch)."""
    import torch

    import exporters
    import models

    arch, options, fmt, shape, name = ARTIFACTS[kind]
    torch.manual_seed(0)
    model = models.create(arch, **options)
    exporters.export(
        model.eval(), out, fmt, name=name, version="1", input_shape=shape, overwrite=True
    )


class Env:
    """Work directory with the fleet key, artifacts and data (reused between runs)."""

    def __init__(self, workdir: Path) -> None:
        self.work = workdir
        self.work.mkdir(parents=True, exist_ok=True)
        self.key = self.work / "fleet.key"
        if not self.key.exists():
            self.key.write_bytes(os.urandom(32))

    def artifact(self, kind: str) -> Path:
        """The artifact folder of ``kind``, exported in a child process the first time."""
        if kind not in ARTIFACTS:
            raise SystemExit(f"unknown artifact {kind}")
        out = self.work / "art" / kind
        if (out / "manifest.json").exists():
            return out
        start = time.monotonic()
        python_output(worker_argv("common", "export", kind=kind, out=out))
        print(f"# exported {kind} in {time.monotonic() - start:.1f} s", file=sys.stderr)
        return out

    def digits_dir(self) -> Path:
        """The digits train and test splits as safetensors (``x``, ``y``) in one folder."""
        out = self.work / "data" / "digits"
        if (out / "test.safetensors").exists():
            return out
        from toolkit.data import load_dataset

        train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
        _save_split(out, train.x, train.y, test)
        return out

    def shard_dirs(self, n: int) -> list[Path]:
        """``n`` IID shards of the digits training split, each with the whole test split."""
        root = self.work / "data" / f"shards{n}"
        dirs = [root / f"{i:03d}" for i in range(n)]
        if all((d / "test.safetensors").exists() for d in dirs):
            return dirs
        import numpy as np

        from toolkit.data import load_dataset

        train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
        order = np.random.default_rng(0).permutation(len(train.y))
        for i, folder in enumerate(dirs):
            index = order[i::n]
            _save_split(folder, np.ascontiguousarray(train.x[index]), train.y[index], test)
        return dirs


def _save_split(folder: Path, train_x: Any, train_y: Any, test: Any) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"x": train_x, "y": train_y}, str(folder / "train.safetensors"))
    save_file({"x": test.x, "y": test.y}, str(folder / "test.safetensors"))


# ---------------------------------------------------------------------- a real daemon
def spawn_daemon(
    env: Env, url: str, device: str, artifact: Path, *extra: str, env_extra: dict | None = None
) -> tuple[subprocess.Popen, Path]:
    """``python -m edge_agent.cli run ...`` for ``device``, its output in ``WORK/DEVICE.log``."""
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
    """SIGTERM, then SIGKILL after 30 s; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    return proc.returncode


@dataclasses.dataclass
class Daemon:
    """A running daemon: its process, the fleet client that talks to it, when it started."""

    device: str
    proc: subprocess.Popen
    fleet: Any
    started: float
    online_s: float = 0.0
    exit_code: int | None = None


@contextlib.contextmanager
def running_daemon(
    env: Env, device: str, artifact: Path, *extra: str, env_extra: dict | None = None
) -> Iterator[Daemon]:
    """A fresh Mosquitto, a :class:`FleetClient` and the daemon, online; all stopped after.

    ``exit_code`` of the yielded :class:`Daemon` is set once the daemon has stopped.
    """
    from toolkit.fleet import FleetClient

    broker = mosquitto()
    try:
        with FleetClient(broker.url, fleet=FLEET, key_file=env.key) as fleet:
            start = time.monotonic()
            proc, log = spawn_daemon(env, broker.url, device, artifact, *extra, env_extra=env_extra)
            daemon = Daemon(device, proc, fleet, start)
            try:
                online = fleet.wait_for(
                    lambda d: d.get(device, {}).get("status") == "online", timeout=120
                )
                if not online:
                    raise RuntimeError(f"{device} not online; log:\n{log.read_text()[-2000:]}")
                daemon.online_s = time.monotonic() - start
                yield daemon
            finally:
                daemon.exit_code = stop_daemon(proc)
    finally:
        broker.stop()


# ------------------------------------------------------------ sender + receiver process
TCP_LABEL = {
    False: "Nagle on (before the fix)",
    True: "as shipped: TCP_NODELAY on broker + clients",
}


def worker_receiver(args: argparse.Namespace) -> int:
    """A separate process that opens frames the way the agent does and acks when done."""
    from edge_agent.protocol import FrameRejected, FrameVerifier, Keyring
    from edge_agent.transport import MqttTransport

    keyring = Keyring.from_file(args.key)
    verifier = FrameVerifier(keyring)
    expected = {
        model: {k: (tuple(v), "float32") for k, v in shapes.items()}
        for model, shapes in args.expected.items()
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
    """Sender transport in this process + receiver process, through one Mosquitto.

    ``expected`` maps a gossip frame's ``model`` header to its tensors' shapes (what the
    receiver passes to ``open_tensors``); artifact frames need none.
    """

    def __init__(
        self,
        env: Env,
        expected: dict[str, dict[str, list[int]]],
        nodelay: bool = True,
        chunk_bytes: int = 256 * 1024,
    ) -> None:
        from edge_agent.protocol import Keyring, Topics
        from edge_agent.transport import MqttTransport

        self.nodelay = nodelay
        self.chunk_bytes = chunk_bytes
        self.broker = mosquitto(nodelay)
        self.keyring = Keyring.from_file(env.key)
        self.topic = Topics(FLEET).gossip("bench-rx")
        ack_topic = f"bitfleet/{FLEET}/bench/ack"
        argv = worker_argv(
            "common",
            "receiver",
            broker=self.broker.url,
            key=env.key,
            topic=self.topic,
            ack_topic=ack_topic,
            expected=expected,
            nodelay=nodelay,
        )
        self.rx = subprocess.Popen(
            argv,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        ready = json.loads(self.rx.stdout.readline() or "{}")
        if ready.get("event") != "ready":
            self.broker.stop()
            raise RuntimeError(f"receiver failed to start: {ready}")
        self.acks: queue.Queue[dict[str, Any]] = queue.Queue()
        self.tx = MqttTransport(url=self.broker.url, client_id=SENDER, tcp_nodelay=nodelay)
        self.tx.subscribe(ack_topic, lambda _t, p: self.acks.put(json.loads(p)), qos=1)
        self.tx.connect(timeout=10)
        self.tx.wait_subscribed(10)

    @property
    def label(self) -> str:
        """The TCP setup, as the records name it."""
        return TCP_LABEL[self.nodelay]

    def chunks(self, frame: bytes) -> list[bytes]:
        """``frame`` cut into signed chunks of ``chunk_bytes``."""
        from edge_agent.protocol import split_chunks

        return split_chunks(
            frame, chunk_bytes=self.chunk_bytes, sender=SENDER, keyring=self.keyring
        )

    def send(self, chunks: list[bytes], timeout: float = 60.0) -> tuple[float, dict[str, Any]]:
        """Publish chunks QoS 1; (monotonic time of the first publish, the receiver's ack)."""
        t_first = time.monotonic()
        for chunk in chunks:
            self.tx.publish(self.topic, chunk, qos=1)
        return t_first, self.acks.get(timeout=timeout)

    def transfer(self, frame: bytes, seq: int) -> tuple[float, dict[str, Any], int]:
        """Cut, publish and wait for ``frame`` (header ``seq``): (first publish, ack, chunks)."""
        chunks = self.chunks(frame)
        t_first, ack = self.send(chunks)
        if ack.get("seq") != seq:
            raise RuntimeError(f"receiver answered {ack} for transfer {seq}")
        return t_first, ack, len(chunks)

    def close(self) -> dict[str, int]:
        """Stop the sender, the receiver and the broker; the receiver's drop counters."""
        self.tx.close()
        self.rx.stdin.close()
        drops = json.loads(self.rx.stdout.readline() or "{}").get("drops", {})
        self.rx.wait(timeout=10)
        self.broker.stop()
        return drops


def each_link(
    env: Env,
    args: argparse.Namespace,
    part: str,
    expected: dict[str, dict[str, list[int]]],
    body: Callable[[Link], None],
) -> None:
    """Run ``body`` over a fresh :class:`Link` with Nagle on, then as shipped (or as shipped
    only without ``--nodelay-variant``); after each, a record of the receiver's drops."""
    for nodelay in [False, True] if args.nodelay_variant else [True]:
        link = Link(env, expected, nodelay, args.chunk_bytes)
        try:
            body(link)
        finally:
            drops = link.close()
        emit(
            {
                "part": part,
                "tcp": link.label,
                "what": "receiver drops",
                "drops": {k: v for k, v in drops.items() if v},
            }
        )


# ------------------------------------------------------------------------------ workers
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.agent.common",
        description="Shared workers of the agent benchmarks (started by the benchmarks).",
    )
    ap.add_argument("--worker", required=True, choices=["export", "receiver"])
    ap.add_argument("--kind", choices=sorted(ARTIFACTS), help="export: which artifact")
    ap.add_argument("--out", type=Path, help="export: artifact folder to write")
    ap.add_argument("--broker", help="receiver: broker URL")
    ap.add_argument("--key", help="receiver: fleet key file")
    ap.add_argument("--topic", help="receiver: topic the frames arrive on")
    ap.add_argument("--ack-topic", help="receiver: topic to publish acks on")
    ap.add_argument(
        "--expected", type=json.loads, default={}, help="receiver: JSON {model: {tensor: shape}}"
    )
    ap.add_argument("--nodelay", action="store_true", help="receiver: TCP_NODELAY on")
    args = ap.parse_args(argv)
    if args.worker == "export":
        export_artifact(args.kind, args.out)
        return 0
    return worker_receiver(args)


if __name__ == "__main__":
    sys.exit(main())
