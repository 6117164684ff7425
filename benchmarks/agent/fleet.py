"""Many agents against one Mosquitto (part ``fleet``).

``--agents`` (default 100) inference-only :class:`Agent` objects run in ``--fleet-workers``
worker processes of in-process agents (LeNet portable artifact, http off, heartbeat 5 s), all
online, then a gossip storm: every agent pushes ``--storm-frames`` signed LeNet frames (fp32,
one chunk each) to 2 random peers, QoS 1. Inference-only agents drop gossip as
``not_learning``, counted in ``Agent.drop_counts()``: every frame delivered is exactly one such
drop, so delivered frames are read from those counters (no extra subscriber adds broker
fan-out). Then, unless ``--fleet-learn-rounds 0``, all agents gossip-learn LeNet for that many
rounds.

A worker process (:func:`worker_fleet`) obeys JSON commands on stdin (``storm``, ``counts``,
``learnstatus``, ``stop``), one JSON answer per line on stdout::

    python -m benchmarks.agent.fleet --worker fleet --broker URL --key FILE --artifact DIR \\
        --work DIR --tensors FILE --first 0 --count 25 --total 100 --shards '{"a000": "DIR"}'
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import (
    FLEET,
    MB,
    ROOT,
    Env,
    child_env,
    cpu_seconds,
    emit,
    jsonable,
    mosquitto,
    proc_status,
    worker_argv,
)

PART = "fleet"
PEERS = 2


def agent_id(i: int) -> str:
    return f"a{i:03d}"


# ------------------------------------------------------------------------ worker process
class FleetWorker:
    """``count`` in-process agents, from ``a{first}`` on, and the commands they obey."""

    def __init__(self, args: argparse.Namespace) -> None:
        from safetensors.numpy import load_file

        from edge_agent.agent import Agent
        from edge_agent.config import AgentConfig

        self.args = args
        self.all_ids = [agent_id(i) for i in range(args.total)]
        self.last_gossip = 0.0
        self.agents: list[Agent] = []
        for i in range(args.first, args.first + args.count):
            device = agent_id(i)
            config = AgentConfig(
                broker=args.broker,
                fleet=FLEET,
                id=device,
                state_dir=str(Path(args.work) / "fleet-state" / device),
                artifact=args.artifact,
                key_file=args.key,
                http_port=0,
                heartbeat_s=5.0,
                data_dir=args.shards.get(device, ""),
            )
            shutil.rmtree(config.state_dir, ignore_errors=True)
            agent = Agent(config)
            agent.start(connect_timeout=60)
            # Same handler, plus the arrival time of the last gossip message (for the duration).
            agent.transport.subscribe(agent.topics.gossip(device), self._timed(agent._on_gossip))
            self.agents.append(agent)
        for agent in self.agents:
            agent.transport.wait_subscribed(30)
        self.tensors = dict(load_file(args.tensors).items())

    def _timed(self, handler: Any) -> Any:
        def timed(topic: str, payload: bytes) -> None:
            handler(topic, payload)
            self.last_gossip = time.monotonic()

        return timed

    def _dropped(self) -> int:
        return sum(a.transport.dropped_publishes for a in self.agents)

    def storm(self, frames: int, peers: int, seed: int) -> dict[str, Any]:
        """Every agent seals ``frames`` frames and publishes each to ``peers`` random peers."""
        from edge_agent.protocol import seal_tensors, split_chunks

        rng = random.Random(seed * 1000 + self.args.first)
        expected: collections.Counter[str] = collections.Counter()
        dropped0 = self._dropped()
        t0 = time.monotonic()
        sent = messages = 0
        frame, chunks = b"", []
        for n in range(frames):
            for agent in self.agents:
                me = agent.config.id
                targets = rng.sample([d for d in self.all_ids if d != me], peers)
                frame = seal_tensors(
                    self.tensors,
                    codec="fp32",
                    sender=me,
                    keyring=agent.keyring,
                    extra={"round": n, "samples": 1, "model": "lenet5"},
                )
                chunks = split_chunks(
                    frame, chunk_bytes=agent.config.chunk_bytes, sender=me, keyring=agent.keyring
                )
                for peer in targets:
                    for chunk in chunks:
                        agent.transport.publish(agent.topics.gossip(peer), chunk, qos=1)
                        messages += 1
                    expected[peer] += 1
                    sent += 1
        t_published = time.monotonic()
        deadline = t_published + 120
        while time.monotonic() < deadline and any(
            len(getattr(a.transport._client, "_out_messages", ())) for a in self.agents
        ):
            time.sleep(0.005)
        return {
            "event": "sent",
            "frames": sent,
            "messages": messages,
            "chunks_per_frame": len(chunks),
            "frame_bytes": len(frame),
            "expected": dict(expected),
            "t0": t0,
            "publish_loop_s": t_published - t0,
            "acked_s": time.monotonic() - t0,
            "dropped_publishes": self._dropped() - dropped0,
        }

    def counts(self) -> dict[str, Any]:
        """Drop counters per agent, transport counters, this process's memory."""
        return {
            "event": "counts",
            "last_gossip": self.last_gossip,
            "drops": {a.config.id: a.drop_counts() for a in self.agents},
            "handler_errors": sum(a.transport.handler_errors for a in self.agents),
            "connects": sum(a.transport.connect_count for a in self.agents),
            **proc_status(os.getpid()),
        }

    def learnstatus(self) -> dict[str, Any]:
        """Each agent's learning state (round, merges, accuracies, error)."""
        rows = {}
        for a in self.agents:
            lr = a.learner
            rows[a.config.id] = {
                "on": a.learning,
                "round": lr.round if lr else None,
                "merges": lr.merges if lr else None,
                "initial": lr.initial_accuracy if lr else None,
                "accuracy": lr.metrics.get("accuracy") if lr else None,
                "error": a._learn_error,
            }
        return {
            "event": "learnstatus",
            "agents": rows,
            "torch_loaded": "torch" in sys.modules,
            **proc_status(os.getpid()),
        }

    def stop(self) -> dict[str, Any]:
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda a: a.shutdown(), self.agents))
        return {"event": "stopped", "shutdown_s": time.monotonic() - t0}


def worker_fleet(args: argparse.Namespace) -> int:
    """Start the agents, say ``ready``, then answer one JSON line per command until ``stop``."""
    import logging

    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    worker = FleetWorker(args)

    def say(body: dict[str, Any]) -> None:
        print(json.dumps(body, default=jsonable), flush=True)

    say({"event": "ready", "pid": os.getpid(), **proc_status(os.getpid())})
    for line in sys.stdin:
        cmd = json.loads(line)
        name = cmd["cmd"]
        if name == "storm":
            say(worker.storm(cmd["frames"], cmd["peers"], cmd["seed"]))
        elif name == "counts":
            say(worker.counts())
        elif name == "learnstatus":
            say(worker.learnstatus())
        elif name == "stop":
            say(worker.stop())
            break
    return 0


# --------------------------------------------------------------------------- the parent
class Workers:
    """``k`` worker processes for ``n`` agents, ``ceil(n / k)`` each (the last the rest).

    ``shards``: one data folder per agent (learning), or none.
    """

    def __init__(
        self,
        env: Env,
        broker_url: str,
        artifact: Path,
        tensors: Path,
        n: int,
        k: int,
        shards: list[Path],
    ) -> None:
        self.t_start = time.monotonic()
        self.procs: list[subprocess.Popen] = []
        self.psutil: list[Any] = []
        self.logs = []
        per = -(-n // k)
        for w in range(k):
            first, count = w * per, min(per, n - w * per)
            if count <= 0:
                break
            mine = range(first, first + count) if shards else range(0)
            shard_map = {agent_id(i): str(shards[i]) for i in mine}
            argv = worker_argv(
                "fleet",
                "fleet",
                broker=broker_url,
                key=env.key,
                artifact=artifact,
                work=env.work,
                first=first,
                count=count,
                total=n,
                tensors=tensors,
                shards=shard_map,
            )
            log = open(env.work / f"fleet-worker{w}.log", "wb")
            self.logs.append(log)
            self.procs.append(
                subprocess.Popen(
                    argv,
                    env=child_env(OMP_NUM_THREADS="1"),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    cwd=ROOT,
                )
            )

    def answers(self) -> list[dict[str, Any]]:
        return [json.loads(w.stdout.readline() or "{}") for w in self.procs]

    def wait_ready(self) -> list[dict[str, Any]]:
        """Every worker's ``ready`` answer (pid, memory), once all its agents are started."""
        import psutil

        ready = self.answers()
        if any(r.get("event") != "ready" for r in ready):
            raise RuntimeError(f"workers failed to start: {ready}")
        self.psutil = [psutil.Process(w.pid) for w in self.procs]
        return ready

    def ask(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """Send ``body`` to every worker; their answers."""
        for w in self.procs:
            w.stdin.write(json.dumps(body) + "\n")
            w.stdin.flush()
        return self.answers()

    def close(self) -> None:
        for w in self.procs:
            with contextlib.suppress(Exception):
                w.stdin.close()
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
        for log in self.logs:
            log.close()


class CpuWindow:
    """CPU seconds of Mosquitto and of the workers over a window of wall time."""

    def __init__(self, broker: Any, workers: list[Any]) -> None:
        self.broker, self.workers = broker, workers
        self.cpu0 = self._cpu()
        self.t0 = time.monotonic()

    def _cpu(self) -> tuple[float, float]:
        return cpu_seconds(self.broker), sum(cpu_seconds(p) for p in self.workers)

    def close(self) -> CpuWindow:
        self.t1 = time.monotonic()
        cpu1 = self._cpu()
        self.wall = self.t1 - self.t0
        self.broker_s, self.agents_s = (b - a for a, b in zip(self.cpu0, cpu1, strict=True))
        return self

    def percent(self, seconds: float) -> float:
        return round(100 * seconds / self.wall, 1)


def _drop_deltas(after: list[dict], before: list[dict]) -> collections.Counter[str]:
    """Drops by reason, all agents together, between two ``counts`` answers."""
    was = {aid: d for c in before for aid, d in c["drops"].items()}
    deltas: collections.Counter[str] = collections.Counter()
    for c in after:
        for aid, drops in c["drops"].items():
            for reason, value in drops.items():
                if value - was[aid].get(reason, 0):
                    deltas[reason] += value - was[aid].get(reason, 0)
    return deltas


def _not_learning(counts: list[dict]) -> int:
    return sum(d.get("not_learning", 0) for c in counts for d in c["drops"].values())


def online(workers: Workers, ready: list[dict], fleet: Any, broker: Any, mosq: Any, n: int) -> None:
    """Wait until all agents' retained states say online; idle CPU over 5 s."""
    ids = [agent_id(i) for i in range(n)]
    all_online = fleet.wait_for(
        lambda d: sum(d.get(i, {}).get("status") == "online" for i in ids) == n,
        timeout=120,
    )
    online_s = time.monotonic() - workers.t_start
    up = sum(fleet.devices().get(i, {}).get("status") == "online" for i in ids)
    time.sleep(2.0)  # let start-up settle before the CPU window opens
    idle = CpuWindow(mosq, workers.psutil)
    time.sleep(5.0)
    idle.close()
    emit(
        {
            "part": PART,
            "what": f"{n} agents online",
            "agents": n,
            "worker_processes": len(workers.procs),
            "online_retained_states": up,
            "all_online": all_online,
            "online_after_s": round(online_s, 1),
            "workers": [{"pid": r["pid"], **proc_status(r["pid"])} for r in ready],
            "mosquitto": {"pid": broker.pid, **proc_status(broker.pid)},
            "idle_cpu_percent": {
                "mosquitto": idle.percent(idle.broker_s),
                "agents_total": idle.percent(idle.agents_s),
            },
        }
    )


def storm(workers: Workers, broker: Any, mosq: Any, n: int, args: argparse.Namespace) -> None:
    """Every agent pushes ``--storm-frames`` frames to 2 peers; count what arrives."""
    before = workers.ask({"cmd": "counts"})
    nl_before = _not_learning(before)
    window = CpuWindow(mosq, workers.psutil)
    sent = workers.ask({"cmd": "storm", "frames": args.storm_frames, "peers": PEERS, "seed": 0})
    expected: collections.Counter[str] = collections.Counter()
    for s in sent:
        expected.update(s["expected"])
    total_expected = sum(expected.values())
    deadline = time.monotonic() + args.storm_timeout
    stable_since, last_total, counts = time.monotonic(), -1, before
    while time.monotonic() < deadline:
        counts = workers.ask({"cmd": "counts"})
        got = _not_learning(counts) - nl_before
        if got != last_total:
            last_total, stable_since = got, time.monotonic()
        if got >= total_expected or time.monotonic() - stable_since > 10:
            break
        time.sleep(0.2)
    window.close()
    last = max(c["last_gossip"] for c in counts)
    per_before = {aid: d for c in before for aid, d in c["drops"].items()}
    lost = extra = 0
    for c in counts:
        for aid, drops in c["drops"].items():
            got = drops.get("not_learning", 0) - per_before[aid].get("not_learning", 0)
            lost += max(0, expected.get(aid, 0) - got)
            extra += max(0, got - expected.get(aid, 0))
    other = _drop_deltas(counts, before)
    other.pop("not_learning", None)
    frame_bytes = sent[0]["frame_bytes"]
    duration = last - window.t0
    emit(
        {
            "part": PART,
            "what": "gossip storm",
            "agents": n,
            "frames_per_agent": args.storm_frames,
            "peers_per_frame": PEERS,
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
            "cpu_window_s": round(window.wall, 2),
            "mosquitto_cpu_percent": window.percent(window.broker_s),
            "mosquitto_cpu_s": round(window.broker_s, 2),
            "agents_cpu_percent_total": window.percent(window.agents_s),
            "agents_cpu_s": round(window.agents_s, 2),
            "workers_after": [
                {k2: c[k2] for k2 in ("VmRSS_mb", "VmHWM_mb", "threads")} for c in counts
            ],
            "mosquitto_after": proc_status(broker.pid),
            "target_met": lost == 0,
        }
    )


def _mean(values: list[float]) -> float | None:
    import numpy as np

    return round(float(np.mean(values)), 4) if values else None


def learn(workers: Workers, fleet: Any, mosq: Any, n: int, args: argparse.Namespace) -> None:
    """``learn.start`` to every agent as a real command; wait until all have stopped."""
    overrides = {
        "rounds": args.fleet_learn_rounds,
        "local_steps": args.fleet_local_steps,
        "round_interval_s": args.fleet_round_interval,
        "peers": PEERS,
    }
    ids = [agent_id(i) for i in range(n)]
    before = workers.ask({"cmd": "counts"})
    window = CpuWindow(mosq, workers.psutil)
    with concurrent.futures.ThreadPoolExecutor(25) as pool:
        replies = list(
            pool.map(lambda d: fleet.command(d, "learn.start", overrides, timeout=300), ids)
        )
    t_started = time.monotonic()
    deadline = window.t0 + args.fleet_learn_timeout
    status: list[dict] = []
    while time.monotonic() < deadline:
        status = workers.ask({"cmd": "learnstatus"})
        if all(not r["on"] for s in status for r in s["agents"].values()):
            break
        time.sleep(1.0)
    window.close()
    drops = _drop_deltas(workers.ask({"cmd": "counts"}), before)
    rows = [r for s in status for r in s["agents"].values()]
    done = [r for r in rows if r["round"] is not None]
    emit(
        {
            "part": PART,
            "what": f"{n} agents gossip-learning LeNet-5",
            "agents": n,
            "learn_started": sum(bool(r.get("ok")) for r in replies),
            "start_errors": [r.get("error") for r in replies if not r.get("ok")][:3],
            "settings": overrides,
            "commands_answered_s": round(t_started - window.t0, 1),
            "wall_s": round(window.wall, 1),
            "rounds_min": min((r["round"] for r in done), default=None),
            "rounds_max": max((r["round"] for r in done), default=None),
            "merges_total": sum(r["merges"] or 0 for r in done),
            "agents_with_merges": sum(bool(r["merges"]) for r in done),
            "accuracy_initial_mean": _mean([r["initial"] for r in done]),
            "accuracy_final_mean": _mean(
                [r["accuracy"] for r in done if r["accuracy"] is not None]
            ),
            "learn_errors": [r["error"] for r in rows if r["error"]][:3],
            "drops": dict(drops),
            "mosquitto_cpu_percent": window.percent(window.broker_s),
            "agents_cpu_percent_total": window.percent(window.agents_s),
            "workers_after": [
                {k2: s[k2] for k2 in ("VmRSS_mb", "VmHWM_mb", "threads", "torch_loaded")}
                for s in status
            ],
        }
    )


def run(env: Env, args: argparse.Namespace) -> None:
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
    n = args.agents
    shards = env.shard_dirs(n) if args.fleet_learn_rounds else []
    broker = mosquitto()
    mosq = psutil.Process(broker.pid)
    workers = None
    try:
        workers = Workers(env, broker.url, artifact, tensors_file, n, args.fleet_workers, shards)
        ready = workers.wait_ready()
        with FleetClient(broker.url, fleet=FLEET, key_file=env.key) as fleet:
            online(workers, ready, fleet, broker, mosq, n)
            storm(workers, broker, mosq, n, args)
            if args.fleet_learn_rounds:
                learn(workers, fleet, mosq, n, args)
        stopped = workers.ask({"cmd": "stop"})
        emit(
            {
                "part": PART,
                "what": "shutdown",
                "shutdown_s_max": round(max(s.get("shutdown_s", 0) for s in stopped), 1),
            }
        )
    finally:
        if workers is not None:
            workers.close()
        broker.stop()


def summarize(r: dict[str, Any]) -> str | None:
    """The summary line of one record of this part (None: not summarised)."""
    what = r.get("what", "")
    if what == "gossip storm":
        return (
            f"fleet  storm: sent {r['frames_sent']} delivered {r['frames_delivered']} lost "
            f"{r['frames_lost']} in {r['duration_s']} s; mosquitto CPU "
            f"{r['mosquitto_cpu_percent']}%  agents CPU {r['agents_cpu_percent_total']}%"
        )
    if "gossip-learning" in what:
        return (
            f"fleet  learning: {r['learn_started']} started, rounds {r['rounds_min']}-"
            f"{r['rounds_max']} in {r['wall_s']} s, merges {r['merges_total']}, accuracy "
            f"{r['accuracy_initial_mean']} -> {r['accuracy_final_mean']}"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.agent.fleet",
        description="Worker process of the fleet benchmark (started by the benchmark).",
    )
    ap.add_argument("--worker", required=True, choices=["fleet"])
    ap.add_argument("--broker", required=True, help="broker URL")
    ap.add_argument("--key", required=True, help="fleet key file")
    ap.add_argument("--artifact", required=True, help="artifact folder every agent serves")
    ap.add_argument("--work", required=True, help="work folder (agents' state under it)")
    ap.add_argument("--tensors", required=True, help="safetensors file of the gossip frames")
    ap.add_argument("--first", type=int, required=True, help="index of the first agent")
    ap.add_argument("--count", type=int, required=True, help="agents in this process")
    ap.add_argument("--total", type=int, required=True, help="agents in the fleet")
    ap.add_argument(
        "--shards", type=json.loads, default={}, help="JSON {agent id: data folder} (learning)"
    )
    return worker_fleet(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
