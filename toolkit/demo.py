"""``bitfleet demo``: a whole fleet on this machine, learning together, in about a minute.

The demo is the project's story told by its real parts, with nothing but the install: the
embedded MQTT broker, ``bitfleet-agent`` processes, the staged rollout, gossip learning with
variance-corrected merging, and the per-round metrics the agents keep. Nothing is simulated;
only the devices are processes on the laptop instead of Raspberry Pis. Its steps:

1. Start the embedded broker (amqtt, a child process) on a free loopback port.
2. Make a fleet key, then train a small model *briefly* on a few hundred labelled digits (the
   "seed set") and export it as a portable packed ONNX artifact with its network spec and its
   float weights (``weights=True``), which on-device learning starts from. A matching seed
   model already in the output folder is reused. The seed model is deliberately undertrained,
   so the fleet has something to learn.
3. Split the rest of the bundled digits among the nodes with Dirichlet label skew (each device
   sees mostly a few classes, as real devices do) and give every node the same held-out test
   set, so the devices' accuracies and their mean are comparable.
4. Start one ``bitfleet-agent run`` process per node (own state directory, fast heartbeat, HTTP
   off) and wait until all are online.
5. Deploy the artifact through the staged rollout (:func:`toolkit.rollout.rollout`).
6. Start gossip learning (``learn.start`` with the merge method and the number of rounds) and
   wait, bounded, until every node has finished its rounds.
7. Collect every device's per-round accuracy (:func:`toolkit.fleet_metrics.collect_metrics`).
8. Write ``report.json`` and ``fleet.png`` (accuracy per device and fleet mean, per round).

With ``compare=True`` steps 4 to 7 run again with plain averaging, on fresh agents and state,
from the same start. Every process the demo starts is stopped at the end, also after an error
or Ctrl-C (SIGTERM first, so agents checkpoint and say goodbye; SIGKILL after a grace period);
on Linux the agents also die with the demo if it is killed outright.

Where learning starts: the deployed artifact carries the seed model's float weights, so every
agent's learner starts from the very model it was given, and "start" in the report is the
deployed model's accuracy on the shared test set.

Output folder (``runs/demo`` by default)::

    fleet.key                   the fleet's HMAC key (kept between runs)
    seed/                       the seed model's checkpoint (reused when it matches)
    artifact/                   its portable artifact, deployed to the fleet
    data/<node>/                train.safetensors (the node's shard), test.safetensors (shared)
    vc/<node>/state/, agent.log each agent's state directory and log (avg/... with compare)
    report.json, fleet.png      the results

The library entry point is :func:`run_demo`; the CLI (``toolkit/cli/demo_cmd.py``) adds the
live table and the printed summary.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from bitfleet.errors import BitfleetError, require
from bitfleet.fsutil import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from toolkit.data import ArrayDataset
    from toolkit.fleet import FleetClient

__all__ = ["DemoConfig", "DemoError", "FleetView", "MAX_NODES", "MERGES", "run_demo"]

MERGES = ("vc", "avg")
"""The merge methods the demo runs: VC merging, and plain averaging with ``compare``."""

_DATASET = "digits"
_KEY_BYTES = 32
_ONLINE_TIMEOUT_S = 60.0  # agents start in a second or two; a loaded machine needs more
_STOP_GRACE_S = 10.0  # an agent finishes its round and checkpoints on SIGTERM
_POLL_S = 0.25
# a learning round takes well under a second here plus its interval; this bounds the wait
_ROUND_BUDGET_S = 15.0
MAX_NODES = 16
"""Each node is a process that learns with torch (about 400 MB): a laptop's worth."""


def _start_budget(nodes: int) -> float:
    """Seconds for ``learn.start``: every agent imports torch at once, on a loaded machine."""
    return 30.0 + 5.0 * nodes


class DemoError(BitfleetError, RuntimeError):
    """A step of the demo failed; the message names the step and where to look."""


@dataclass(frozen=True)
class DemoConfig:
    """Everything that shapes a demo run (recorded in ``report.json``).

    The defaults finish in well under a minute on 2 cores (about 25 s with the seed model's
    training, while other jobs load the machine) and show learning: a seed model of about
    50 % test accuracy that the fleet takes to about 90 % in 10 rounds.
    """

    nodes: int = 4
    rounds: int = 10
    model: str = "lenet5"
    compare: bool = False
    out: Path = Path("runs/demo")
    seed: int = 0
    seed_images: int = 300
    seed_epochs: int = 2
    partition: str = "dirichlet:1.0"
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 0.05
    round_interval_s: float = 0.5
    heartbeat_s: float = 0.5
    fleet: str = "demo"

    def __post_init__(self) -> None:
        if isinstance(self.nodes, bool) or not 2 <= self.nodes <= MAX_NODES:
            raise ValueError(
                f"--nodes must be between 2 and {MAX_NODES} (gossip needs a peer; each "
                f"node is a process that learns with torch), got {self.nodes}"
            )
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if self.seed_images < 10 or self.seed_epochs < 1:
            raise ValueError("the seed set needs at least 10 images and 1 epoch")
        for name in ("local_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.round_interval_s < 0 or self.heartbeat_s <= 0:
            raise ValueError("lr and heartbeat_s must be > 0, round_interval_s >= 0")

    @property
    def merges(self) -> tuple[str, ...]:
        """The merge methods to run, VC first."""
        return MERGES if self.compare else MERGES[:1]

    def device_ids(self) -> list[str]:
        width = max(2, len(str(self.nodes)))
        return [f"node-{i:0{width}d}" for i in range(1, self.nodes + 1)]

    def learn_args(self, merge: str) -> dict[str, Any]:
        """The ``learn.start`` arguments of a run with ``merge``."""
        return {
            "merge": merge,
            "rounds": self.rounds,
            "local_steps": self.local_steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "optimizer": "sgd",
            "round_interval_s": self.round_interval_s,
        }


@dataclass(frozen=True)
class FleetView:
    """What a live view of one run needs besides the client: where the fleet is."""

    broker: str
    fleet: str
    key_file: Path
    merge: str


Status = Callable[[str], None]
Watch = Callable[["FleetClient", FleetView], AbstractContextManager[Callable[[], None]]]


@contextlib.contextmanager
def _no_view(client: FleetClient, view: FleetView) -> Iterator[Callable[[], None]]:
    yield lambda: None


# ------------------------------------------------------------------------------- processes
def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a child get SIGTERM when the demo dies (Linux), or None.

    The libc function is looked up here, in the parent: the child only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return arm


@dataclass
class _Child:
    role: str
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes] | None = None

    def tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


class _Processes:
    """Every process the demo starts; :meth:`close` stops them all (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.broker: Any = None  # edge_agent.broker.EmbeddedBroker
        self.children: list[_Child] = []
        self.started: list[dict[str, Any]] = []  # every pid, for the report
        self._arm = _parent_death_signal()

    def start_broker(self) -> str:
        from edge_agent.broker import EmbeddedBroker

        self.broker = EmbeddedBroker().start()
        self.started.append({"role": "broker", "id": "amqtt", "pid": self.broker.pid})
        return str(self.broker.url)

    def spawn_agent(self, device: str, argv: Sequence[str], workdir: Path) -> _Child:
        """Start ``bitfleet-agent run ARGV`` as ``python -m edge_agent.cli`` (same install)."""
        import edge_agent

        root = str(Path(edge_agent.__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["OMP_NUM_THREADS"] = "1"  # N learners on a few cores: one thread each
        workdir.mkdir(parents=True, exist_ok=True)
        log_path = workdir / "agent.log"
        log = open(log_path, "ab")  # closed in stop_agents
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "run", *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops them in order
                preexec_fn=self._arm,  # calls prctl only
            )
        except BaseException:
            log.close()
            raise
        child = _Child("agent", device, proc, log_path, log)
        self.children.append(child)
        self.started.append({"role": "agent", "id": device, "pid": proc.pid})
        return child

    def stop_agents(self) -> None:
        """SIGTERM every agent, wait up to the grace period, SIGKILL what is left."""
        for child in self.children:
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.terminate()
        deadline = time.monotonic() + _STOP_GRACE_S
        for child in self.children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                child.proc.wait()
            if child.log is not None:
                child.log.close()
        self.children.clear()

    def close(self) -> None:
        try:
            self.stop_agents()
        finally:
            if self.broker is not None:
                self.broker.close()
                self.broker = None


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While the demo runs, SIGTERM acts as Ctrl-C, so the clean-up in ``finally`` runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------- seed and data
def _fleet_key(out: Path) -> Path:
    """The fleet key in ``out``: kept if it is usable, else a new 32 random bytes (0600)."""
    path = out / "fleet.key"
    if path.is_file() and path.stat().st_size >= _KEY_BYTES:
        return path
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    atomic_write_bytes(path, secrets.token_bytes(_KEY_BYTES))  # keeps the 0600 mode
    return path


def _split(config: DemoConfig, train: ArrayDataset) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the seed set and of the rest (the nodes' data), seeded."""
    if config.seed_images >= len(train) - config.nodes:
        raise ValueError(
            f"a seed set of {config.seed_images} images leaves too little of the "
            f"{len(train)} training digits for {config.nodes} nodes"
        )
    order = np.random.default_rng(config.seed).permutation(len(train))
    return np.sort(order[: config.seed_images]), np.sort(order[config.seed_images :])


@dataclass(frozen=True)
class _Seed:
    checkpoint: Path
    artifact: Path
    accuracy: float
    reused: bool


def _seed_model(
    config: DemoConfig, train: ArrayDataset, test: ArrayDataset, seed_idx: np.ndarray, show: bool
) -> _Seed:
    """Train (or reuse) the briefly trained seed model and its portable artifact."""
    import exporters
    from exporters.artifact import verify_artifact
    from toolkit.data import ArrayDataset as Arrays
    from toolkit.train import TrainConfig
    from toolkit.train import train as train_model

    run_dir, art_dir = config.out / "seed", config.out / "artifact"
    train_config = TrainConfig(
        model=config.model,
        dataset=_DATASET,
        epochs=config.seed_epochs,
        batch_size=config.batch_size,
        seed=config.seed,
    )
    recipe = {"seed_images": config.seed_images, "seed": config.seed, "dataset": _DATASET}
    reused = _matching_seed(run_dir, art_dir, asdict(train_config), recipe)
    if not reused:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(art_dir, ignore_errors=True)
        seed_set = Arrays(
            _DATASET, train.x[seed_idx], train.y[seed_idx], train.classes, train.mean, train.std
        )
        train_model(train_config, run_dir, progress=show, train_data=seed_set, test_data=test)
        exporters.export(
            run_dir,
            art_dir,
            "onnx-portable",
            name=f"demo-{config.model}",
            version="1",
            weights=True,
        )
        verify_artifact(art_dir)
        atomic_write_json(run_dir / "demo.json", recipe)
    history = json.loads((run_dir / "history.json").read_text())
    return _Seed(run_dir, art_dir, float(history[-1]["test_accuracy"]), reused)


def _matching_seed(
    run_dir: Path, art_dir: Path, train_config: dict[str, Any], recipe: dict[str, Any]
) -> bool:
    """Whether ``run_dir`` holds a finished seed model of these settings, and its artifact."""
    from exporters.artifact import verify_artifact
    from models import checkpoint

    try:
        same = (
            json.loads((run_dir / "config.json").read_text()) == train_config
            and json.loads((run_dir / "demo.json").read_text()) == recipe
            and checkpoint.is_checkpoint(run_dir)
            and (run_dir / "history.json").is_file()
        )
        if not same:
            return False
        # learning starts from the weights the artifact carries: one without them is stale
        return "weights_file" in verify_artifact(art_dir)
    except (OSError, ValueError, BitfleetError):
        return False


def _write_node_data(
    config: DemoConfig, train: ArrayDataset, test: ArrayDataset, rest: np.ndarray
) -> dict[str, Path]:
    """Each node's training data and the shared test set, as the agents read them.

    A node's data is its label-skewed shard or, with ``dirichlet-pool``, the whole split and
    the node's own label probabilities.
    """
    from safetensors.numpy import save

    from toolkit.partition import node_train_sets

    sets = node_train_sets(
        config.partition, train.x[rest], train.y[rest], config.nodes, seed=config.seed
    )
    root = config.out / "data"
    shutil.rmtree(root, ignore_errors=True)
    test_bytes = save({"x": np.ascontiguousarray(test.x), "y": np.ascontiguousarray(test.y)})
    dirs = {}
    for device, arrays in zip(config.device_ids(), sets, strict=True):
        folder = root / device
        folder.mkdir(parents=True)
        shard = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
        atomic_write_bytes(folder / "train.safetensors", save(shard))
        atomic_write_bytes(folder / "test.safetensors", test_bytes)
        dirs[device] = folder
    return dirs


# ------------------------------------------------------------------------------- one run
@dataclass
class _Run:
    merge: str
    metrics: dict[str, Any]
    rollout: dict[str, Any]
    seconds: float

    def summary(self, rounds: int) -> dict[str, Any]:
        mean = sorted(self.metrics.get("mean", []), key=lambda e: e["round"])
        if not mean:
            raise DemoError(
                f"the {self.merge} run returned no metrics: {self.metrics.get('errors') or '?'}"
            )
        end = next((e for e in mean if e["round"] == rounds), mean[-1])
        devices = []
        for device, entries in sorted(self.metrics.get("devices", {}).items()):
            if entries:
                last = max(entries, key=lambda e: e["round"])
                devices.append({"id": device, "round": last["round"], "accuracy": last["accuracy"]})
        return {
            "merge": self.merge,
            "accuracy": {"start": mean[0]["accuracy"], "end": end["accuracy"]},
            "devices": devices,
            "seconds": round(self.seconds, 1),
            "metrics": self.metrics,
            "rollout": self.rollout,
        }


def _agent_argv(
    config: DemoConfig, url: str, fleet: str, device: str, key: Path, state: Path, data: Path
) -> list[str]:
    return [
        "--broker", url,
        "--fleet", fleet,
        "--id", device,
        "--state-dir", str(state.resolve()),
        "--key-file", str(key.resolve()),
        "--data-dir", str(data.resolve()),
        "--http-port", "0",
        "--heartbeat-s", f"{config.heartbeat_s:g}",
        "--threads", "1",
    ]  # fmt: skip


def _wait_online(client: FleetClient, agents: Mapping[str, _Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = client.devices()
        waiting = [d for d in agents if states.get(d, {}).get("status") != "online"]
        if not waiting:
            return
        _check_alive(agents)
        if time.monotonic() > deadline:
            first = agents[waiting[0]]
            raise DemoError(
                f"{', '.join(waiting)} did not come online within {timeout:g} s; see "
                f"{first.log_path}: {first.tail() or '(empty log)'}"
            )
        time.sleep(_POLL_S)


def _check_alive(agents: Mapping[str, _Child]) -> None:
    for device, child in agents.items():
        code = child.proc.poll()
        if code is not None:
            raise DemoError(
                f"agent {device} exited with status {code}; see {child.log_path}: "
                f"{child.tail() or '(empty log)'}"
            )


def _deploy(
    client: FleetClient, artifact: Path, devices: list[str], say: Status, merge: str
) -> dict[str, Any]:
    """The staged rollout: a canary device, then waves that double; an error if it stopped."""
    from toolkit.rollout import RolloutEvent, rollout

    def progress(event: RolloutEvent) -> None:
        if event.kind == "wave_started":
            wave = "canary" if event.wave == 0 else f"wave {event.wave}"
            say(f"[{merge}] rollout {wave}: {', '.join(event.devices)}")

    result = rollout(client, artifact, devices, timeout_s=120.0, on_progress=progress)
    if not result.ok:
        raise DemoError(f"the rollout of {artifact} stopped: {result.error}")
    return result.to_dict()


def _start_learning(client: FleetClient, devices: list[str], args: dict[str, Any]) -> None:
    """``learn.start`` on every device at once (each imports torch, which takes seconds)."""
    pool = ThreadPoolExecutor(max_workers=len(devices))
    try:
        replies = list(
            pool.map(
                lambda d: client.command(
                    d, "learn.start", args, timeout=_start_budget(len(devices))
                ),
                devices,
            )
        )
    except BaseException:
        # Ctrl-C while the agents import torch: free the threads now, not after the budget
        # (closing also fails the requests that threads have not sent yet)
        client.close()
        raise
    finally:
        pool.shutdown(wait=True)
    refused = [f"{r['device']}: {r.get('error')}" for r in replies if not r.get("ok")]
    if refused:
        raise DemoError(f"learn.start was refused by {'; '.join(refused)}")


def _wait_rounds(
    client: FleetClient,
    agents: Mapping[str, _Child],
    rounds: int,
    refresh: Callable[[], None],
    timeout: float,
) -> None:
    """Until every device reports ``rounds`` learning rounds in its telemetry (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        refresh()
        behind = []
        for device in agents:
            learning = (client.telemetry(device) or {}).get("learning") or {}
            if learning.get("error"):
                raise DemoError(f"{device} stopped learning: {learning['error']}")
            done = learning.get("round")
            if not isinstance(done, int) or done < rounds:
                behind.append(f"{device} at round {done if done is not None else 0}")
        if not behind:
            refresh()
            return
        _check_alive(agents)
        if time.monotonic() > deadline:
            raise DemoError(
                f"the fleet did not finish {rounds} rounds within {timeout:g} s: "
                f"{', '.join(behind)} (the agents' logs are in their folders)"
            )
        time.sleep(_POLL_S)


def _run_fleet(
    config: DemoConfig,
    merge: str,
    procs: _Processes,
    url: str,
    key: Path,
    seed: _Seed,
    data_dirs: Mapping[str, Path],
    status: Status,
    watch: Watch,
) -> _Run:
    """Steps 4 to 7 for one merge method, on fresh agents, fleet name and state."""
    from toolkit.fleet import FleetClient
    from toolkit.fleet_metrics import collect_metrics

    started = time.monotonic()
    devices = config.device_ids()
    fleet = f"{config.fleet}-{merge}"  # a fleet of its own: no state or telemetry carries over
    run_root = config.out / merge
    shutil.rmtree(run_root, ignore_errors=True)
    agents: dict[str, _Child] = {}
    for device in devices:
        node = run_root / device
        state = node / "state"
        argv = _agent_argv(config, url, fleet, device, key, state, data_dirs[device])
        agents[device] = procs.spawn_agent(device, argv, node)
    status(f"[{merge}] started {len(agents)} agents; waiting until they are online")
    with FleetClient(url, fleet=fleet, key_file=key) as client:
        _wait_online(client, agents, _ONLINE_TIMEOUT_S)
        status(f"[{merge}] all {len(agents)} agents online; staged rollout of {seed.artifact}")
        rollout_report = _deploy(client, seed.artifact, devices, status, merge)
        status(f"[{merge}] deployed; learning {config.rounds} rounds with {merge} merging")
        _start_learning(client, devices, config.learn_args(merge))
        timeout = _start_budget(len(devices)) + config.rounds * _ROUND_BUDGET_S
        with watch(client, FleetView(url, fleet, key, merge)) as refresh:
            _wait_rounds(client, agents, config.rounds, refresh, timeout)
        metrics = collect_metrics(client, devices, timeout=10.0)
    procs.stop_agents()
    return _Run(merge, metrics, rollout_report, time.monotonic() - started)


# ---------------------------------------------------------------------------------- report
def _plot(runs: Sequence[_Run], path: Path, config: DemoConfig) -> Path:
    """``fleet.png``: accuracy per device and fleet mean per round, one panel per run."""
    from toolkit.fleet_metrics import plot_metrics

    title = f"{config.model}, {config.nodes} nodes, {config.partition}"
    if len(runs) == 1:
        return Path(plot_metrics(runs[0].metrics, path, title=f"{title}, {runs[0].merge} merging"))
    return _plot_compare(runs, path, title)


def _plot_compare(runs: Sequence[_Run], path: Path, title: str) -> Path:
    """One panel per merge method, each drawn by :func:`toolkit.fleet_metrics.draw_metrics`.

    The panels share the y axis and one legend (the devices are the same in every run).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from toolkit.fleet_metrics import draw_metrics

    figure = Figure(figsize=(5.5 * len(runs), 4.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(runs), sharey=True)
    for ax, run in zip(axes, runs, strict=True):
        draw_metrics(ax, run.metrics, title=f"{run.merge} merging")
        ax.set_ylabel("")
    for ax in axes[:-1]:
        legend = ax.get_legend()
        if legend is not None:
            legend.remove()
    axes[0].set_ylabel("accuracy on the shared test set")
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def run_demo(
    config: DemoConfig,
    *,
    status: Status | None = None,
    watch: Watch | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the demo (see the module's doc); the report, also written to ``out/report.json``.

    ``status`` gets one line per step; ``watch(client, view)`` is entered while the fleet
    learns and yields a ``refresh()`` the wait loop calls about four times a second (the CLI
    draws the live table with it); ``progress`` shows the seed model's training bar.
    """
    import models
    from toolkit.data import load_dataset
    from toolkit.partition import parse_partition

    say = status or (lambda message: None)
    view = watch or _no_view
    # what could stop the demo half-way fails here, before anything starts
    require("amqtt", "train", "bitfleet demo's embedded broker")
    models.model_entry(config.model)
    parse_partition(config.partition)
    if config.out.exists() and not config.out.is_dir():
        raise NotADirectoryError(f"--out {config.out} is a file, not a folder; choose another")
    started = time.monotonic()
    procs = _Processes()
    with _sigterm_interrupts():
        try:
            url = procs.start_broker()
            say(f"broker (amqtt) listening on {url}")
            config.out.mkdir(parents=True, exist_ok=True)
            key = _fleet_key(config.out)
            train, test = load_dataset(_DATASET, "train"), load_dataset(_DATASET, "test")
            seed_idx, rest = _split(config, train)
            say(
                f"seed model: {config.model} on {len(seed_idx)} labelled digits, "
                f"{config.seed_epochs} epoch(s)"
            )
            seed = _seed_model(config, train, test, seed_idx, progress)
            say(
                f"seed model {'reused' if seed.reused else 'trained'}: test accuracy "
                f"{seed.accuracy:.3f}; artifact {seed.artifact}"
            )
            data_dirs = _write_node_data(config, train, test, rest)
            say(f"{config.nodes} nodes share {len(rest)} digits ({config.partition})")
            runs = [
                _run_fleet(config, merge, procs, url, key, seed, data_dirs, say, view)
                for merge in config.merges
            ]
        finally:
            procs.close()
    summaries = {run.merge: run.summary(config.rounds) for run in runs}
    main = summaries[config.merges[0]]
    report_path, plot_path = config.out / "report.json", config.out / "fleet.png"
    _plot(runs, plot_path, config)
    settings = asdict(config)
    settings["out"] = str(config.out)
    report = {
        "nodes": config.nodes,
        "rounds": config.rounds,
        "model": config.model,
        "merge": main["merge"],
        "accuracy": main["accuracy"],
        "devices": main["devices"],
        "seed_model": {
            "images": config.seed_images,
            "epochs": config.seed_epochs,
            "accuracy": seed.accuracy,
            "reused": seed.reused,
            "checkpoint": str(seed.checkpoint),
            "artifact": str(seed.artifact),
        },
        "runs": summaries,
        "settings": settings,
        "processes": procs.started,
        "seconds": round(time.monotonic() - started, 1),
        "report": str(report_path),
        "plot": str(plot_path),
    }
    atomic_write_json(report_path, report)
    return report
