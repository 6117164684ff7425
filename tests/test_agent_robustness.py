"""The agent and the laptop client against a new user's mistakes, on real brokers.

Bad numbers sent for inference, two agents started with one device id, learning switched on
without data, a broker that is not there, start-up failures, damaged artifacts, a wrong key, a
deploy of an artifact nobody published: each gets one clear answer, never a traceback, an
invalid JSON reply or silence.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from agent_support import FLEET, agent_config, daemon_args, online
from safetensors.numpy import save_file

from edge_agent.agent import Agent
from edge_agent.broker import free_port
from edge_agent.config import ConfigError
from edge_agent.protocol import Keyring
from edge_agent.transport import MqttTransport
from exporters import runtime
from exporters.artifact import ArtifactError, sha256_file
from toolkit.fleet import FleetClient, FleetError

ROOT = Path(__file__).resolve().parents[1]
HUGE = 3.4e38  # finite float32 values whose sums overflow: the model's logits come out NaN


def _until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def _strict_json(data: bytes):
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(data, parse_constant=refuse)


def _post(port: int, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/infer", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _huge_batch() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.choice([-1.0, 1.0], size=(2, 1, 32, 32)) * HUGE).astype(np.float32)


# ------------------------------------------------------------------------ non-finite numbers
def test_non_finite_inputs_over_mqtt_get_an_error_reply_and_are_counted(
    mosquitto, fleet, agents, key_file, artifact, tmp_path
):
    agent = agents(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifact)))
    batch = np.zeros((2, 1, 32, 32), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = batch.copy()
        poisoned[1, 0, 3, 4] = bad
        reply = fleet.infer("pi-01", poisoned, timeout=5)
        assert not reply["ok"]
        assert "NaN or Inf" in reply["error"] and "(1, 0, 3, 4)" in reply["error"]
    assert agent.drop_counts()["bad_input"] == 3
    assert agent.transport.handler_errors == 0
    assert fleet.infer("pi-01", batch, timeout=5)["ok"]  # and it serves on
    assert agent.telemetry()["drops"]["bad_input"] == 3


def test_non_finite_inputs_over_http_are_a_400_with_a_json_error(
    mosquitto, agents, key_file, artifact, tmp_path
):
    port = free_port()
    agent = agents(
        agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifact), http_port=port)
    )
    batch = np.zeros((1, 1, 32, 32)).tolist()
    batch[0][0][5][6] = float("nan")
    status, data = _post(port, json.dumps({"inputs": batch}).encode())  # Python writes NaN
    assert status == 400
    error = _strict_json(data)["error"]
    assert "NaN or Inf" in error and "(0, 0, 5, 6)" in error
    batch[0][0][5][6] = float("inf")
    status, data = _post(port, json.dumps({"inputs": batch}).encode())
    assert status == 400 and "NaN or Inf" in _strict_json(data)["error"]
    assert agent.drop_counts()["bad_input"] == 2


def test_non_finite_logits_are_an_error_reply_never_invalid_json(
    mosquitto, fleet, agents, key_file, artifact, tmp_path
):
    huge = _huge_batch()
    assert not np.isfinite(runtime.load(artifact).predict(huge)).all()  # the premise
    port = free_port()
    agent = agents(
        agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifact), http_port=port)
    )
    reply = fleet.infer("pi-01", huge, timeout=5)
    assert not reply["ok"] and "non-finite logits" in reply["error"]
    status, data = _post(port, json.dumps({"inputs": huge.tolist()}).encode())
    assert status == 400 and "non-finite logits" in _strict_json(data)["error"]
    assert agent.drop_counts()["bad_output"] == 2
    assert agent.transport.handler_errors == 0


def test_a_reply_that_is_not_json_becomes_an_error_reply(
    mosquitto, fleet, agents, key_file, artifact, tmp_path
):
    agent = agents(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifact)))
    agent.requests._infer = lambda inputs: {"logits": [[float("nan")]]}  # a bug, say
    reply = fleet.infer("pi-01", np.zeros((1, 1, 32, 32), np.float32), timeout=5)
    assert not reply["ok"] and "internal error" in reply["error"]
    assert agent.transport.handler_errors == 0


# --------------------------------------------------------------------------- one id, twice
def test_a_second_agent_with_the_same_id_stops_instead_of_fighting(
    mosquitto, fleet, agents, key_file, artifact, tmp_path
):
    first = agents(agent_config(mosquitto.url, key_file, tmp_path / "a", artifact=str(artifact)))
    assert fleet.wait_for(online("pi-01"))
    second = agents(agent_config(mosquitto.url, key_file, tmp_path / "b", artifact=str(artifact)))
    assert second.wait(timeout=15), "the second agent kept fighting for the id"
    assert second.conflict is not None and "'pi-01'" in second.conflict
    assert "--id" in second.conflict
    second.shutdown()
    assert not first.stopping.is_set()  # the agent that was there first serves on
    instance = first.presence.instance
    assert fleet.wait_for(lambda d: d.get("pi-01", {}).get("instance") == instance)
    assert online("pi-01")(fleet.devices())
    connects = first.transport.connect_count
    time.sleep(1.5)
    assert first.transport.connect_count == connects  # no more flapping
    assert fleet.command("pi-01", "ping", timeout=5)["ok"]


def test_a_restart_after_a_crash_is_not_taken_for_a_second_agent(
    mosquitto, fleet, agents, key_file, artifact, tmp_path
):
    crashed = Agent(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifact)))
    crashed.start(connect_timeout=10)
    assert fleet.wait_for(online("pi-01"))
    # kill -9: the process is gone, its connection lingers until the broker's keepalive ends
    crashed.stopping.set()
    crashed.transport._client.loop_stop()
    try:
        again = agents(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifact)))
        mine = again.presence.instance
        assert fleet.wait_for(lambda d: d.get("pi-01", {}).get("instance") == mine)
        assert online("pi-01")(fleet.devices())
        assert not again.wait(timeout=1.5) and again.conflict is None
    finally:
        crashed.transport.close(clean=False)


def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _run_args(url: str, key_file: Path, state: Path, *extra: str) -> list[str]:
    return ["run", *daemon_args(url, key_file, state, *extra)]


def _finish(process: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"bitfleet-agent still runs after {timeout} s; its log:\n{err[-3000:]}")
    return process.returncode, err


@pytest.mark.slow
def test_the_daemon_with_a_taken_id_exits_non_zero_naming_it(
    mosquitto, fleet, agents, key_file, artifact, tmp_path
):
    first = agents(
        agent_config(mosquitto.url, key_file, tmp_path / "a", artifact=str(artifact), id="pi-09")
    )
    assert fleet.wait_for(online("pi-09"))
    process = _spawn(
        _run_args(mosquitto.url, key_file, tmp_path / "b", "--artifact", str(artifact))
    )
    code, err = _finish(process)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'pi-09'" in errors[0], err
    assert "Traceback" not in err
    assert not first.stopping.is_set()
    assert fleet.wait_for(lambda d: d.get("pi-09", {}).get("instance") == first.presence.instance)


# ------------------------------------------------------------------------- start-up errors
def _agent_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", *args],
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"bitfleet-agent {' '.join(args[:1])} still runs after {timeout} s: {err}")


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_learn_without_usable_data_fails_at_start(key_file, artifact, tmp_path):
    url = f"mqtt://127.0.0.1:{free_port()}"
    state = tmp_path / "state"
    missing = tmp_path / "no-such-data"
    done = _agent_cli(
        *_run_args(url, key_file, state, "--artifact", str(artifact)),
        "--learn",
        "--data-dir",
        str(missing),
    )
    line = _error_line(done)
    assert str(missing) in line and "does not exist" in line
    assert not state.exists()
    empty = tmp_path / "empty-data"
    empty.mkdir()
    done = _agent_cli(
        *_run_args(url, key_file, state, "--artifact", str(artifact)),
        "--learn",
        "--data-dir",
        str(empty),
    )
    line = _error_line(done)
    assert "train.safetensors" in line and str(empty) in line
    assert not state.exists()
    save_file({"x": np.zeros((4, 1, 32, 32), np.float32)}, str(empty / "train.safetensors"))
    with pytest.raises(ConfigError, match="'y'"):
        Agent(
            agent_config(
                url, key_file, state, artifact=str(artifact), learn=True, data_dir=str(empty)
            )
        ).start(connect_timeout=1)
    assert not state.exists()


def test_a_failed_start_leaves_no_state_directory_it_created(key_file, artifact, tmp_path):
    url = f"mqtt://127.0.0.1:{free_port()}"
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    state = tmp_path / "new" / "deeper" / "state"
    _error_line(_agent_cli(*_run_args(url, short, state, "--artifact", str(artifact))))
    assert not (tmp_path / "new").exists()
    _error_line(_agent_cli(*_run_args(url, key_file, state, "--artifact", str(tmp_path / "x"))))
    assert not (tmp_path / "new").exists()
    # a state directory that was there before stays, whatever it holds
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "note").write_text("mine")
    _error_line(_agent_cli(*_run_args(url, key_file, kept, "--artifact", str(tmp_path / "x"))))
    assert (kept / "note").read_text() == "mine"


def _damaged(artifact: Path, where: Path) -> Path:
    shutil.copytree(artifact, where)
    with open(where / "model.onnx", "ab") as handle:
        handle.write(b"tampered")
    return where


def _unloadable(artifact: Path, where: Path) -> Path:
    """An artifact whose checksums verify but whose model ONNX Runtime cannot load."""
    shutil.copytree(artifact, where)
    (where / "model.onnx").write_bytes(b"not an onnx model")
    manifest = json.loads((where / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(where / "model.onnx")
    (where / "manifest.json").write_text(json.dumps(manifest))
    return where


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("damaged", r"model\.onnx does not match the SHA-256 in manifest\.json"),
        ("damaged-tar", r"model\.onnx does not match the SHA-256 in manifest\.json"),
        ("unloadable", r"ONNX Runtime cannot load"),
    ],
)
def test_artifact_errors_name_the_path_the_user_gave(key_file, artifact, tmp_path, kind, expected):
    if kind == "unloadable":
        given = _unloadable(artifact, tmp_path / "art")
    else:
        given = _damaged(artifact, tmp_path / "art")
    if kind == "damaged-tar":
        given = Path(shutil.make_archive(str(tmp_path / "art"), "tar", tmp_path, "art"))
    state = tmp_path / "state"
    state.mkdir()
    url = f"mqtt://127.0.0.1:{free_port()}"
    agent = Agent(agent_config(url, key_file, state, artifact=str(given)))
    with pytest.raises(ArtifactError, match=expected) as caught:
        agent.start(connect_timeout=1)
    message = str(caught.value)
    assert str(given) in message, message
    assert str(state) not in message and ".install-" not in message, message


# ----------------------------------------------------------------------- unreachable broker
def test_an_unreachable_broker_is_announced_once_with_the_retry_schedule(caplog):
    url = f"mqtt://127.0.0.1:{free_port()}"
    transport = MqttTransport(url=url, client_id="pi-01", reconnect_min_s=0.05, reconnect_max_s=0.2)
    with caplog.at_level(logging.INFO, logger="edge_agent.transport"):
        transport.connect(timeout=None)
        time.sleep(1.5)  # several attempts
        transport.close()
    said = [r.getMessage() for r in caplog.records if r.name == "edge_agent.transport"]
    assert len(said) == 1, said
    assert url in said[0] and "0.05" in said[0] and "0.2 s" in said[0], said[0]


def test_the_agent_says_it_connects_in_the_background(caplog, key_file, artifact, tmp_path):
    url = f"mqtt://127.0.0.1:{free_port()}"
    agent = Agent(agent_config(url, key_file, tmp_path, artifact=str(artifact)))
    with caplog.at_level(logging.INFO, logger="bitfleet.agent"):
        agent.start(connect_timeout=None)
        agent.shutdown()
    said = [r.getMessage() for r in caplog.records if r.name == "bitfleet.agent"]
    started = [line for line in said if url in line]
    assert len(started) == 1 and "connecting to broker" in started[0], said
    assert "every 0.5 s" in started[0] and "every 30 s" in started[0], said


# ---------------------------------------------------------------------------------- --debug
def test_bitfleet_agent_debug_shows_tracebacks_and_only_then(tmp_path):
    args = ("run", "--state-dir", str(tmp_path / "s"), "--key-file", str(tmp_path / "k"))
    plain = _agent_cli(*args)
    assert (
        _error_line(plain) == "error: no device id: pass --id DEVICE (or set id in the config file)"
    )
    debug = _agent_cli("--debug", *args)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "ConfigError: no device id" in debug.stderr
    debug = _agent_cli("--debug", "config", "--config", str(tmp_path / "none.toml"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


# --------------------------------------------------------------------------- laptop client
def test_devices_right_after_connecting_lists_the_retained_states(
    broker, agents, key_file, artifact, tmp_path
):
    agents(agent_config(broker.url, key_file, tmp_path / "a", artifact=str(artifact)))
    agents(agent_config(broker.url, key_file, tmp_path / "b", artifact=str(artifact), id="pi-02"))
    with FleetClient(broker.url, fleet=FLEET, key_file=key_file) as watcher:
        assert watcher.wait_for(lambda d: online("pi-01")(d) and online("pi-02")(d))
    for _ in range(5):
        with FleetClient(broker.url, fleet=FLEET, key_file=key_file) as client:
            assert sorted(client.devices()) == ["pi-01", "pi-02"]


def test_a_wrong_key_is_named_when_the_device_does_not_answer(
    mosquitto, agents, key_file, artifact, tmp_path
):
    agents(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifact)))
    wrong = Keyring(b"w" * 32)
    with FleetClient(mosquitto.url, fleet=FLEET, keyring=wrong) as client:
        with pytest.raises(FleetError, match="did not answer 'ping'") as caught:
            client.command("pi-01", "ping", timeout=1)
    assert "key" in str(caught.value) and "pi-01" in str(caught.value)


def test_an_online_device_that_does_not_answer_may_hold_another_key(
    mosquitto, agents, key_file, artifact, tmp_path
):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "laptop.key").write_bytes(b"L" * 32)  # the device expects the laptop's own key
    agents(
        agent_config(
            mosquitto.url,
            key_file,
            tmp_path / "s",
            artifact=str(artifact),
            device_keys_dir=str(keys),
        )
    )
    with FleetClient(mosquitto.url, fleet=FLEET, key_file=key_file) as client:
        assert client.wait_for(online("pi-01"))  # its state verifies under the fleet key
        with pytest.raises(FleetError, match="is online but did not answer 'ping'") as caught:
            client.command("pi-01", "ping", timeout=1)
    assert "key" in str(caught.value)


def test_a_deploy_waits_for_the_devices_own_error(
    mosquitto, fleet, agents, key_file, artifact, tmp_path
):
    agents(agent_config(mosquitto.url, key_file, tmp_path, artifact=str(artifact)))
    assert fleet.wait_for(online("pi-01"))
    args = {"name": "digits", "version": "7", "sha256": "a" * 64, "timeout_s": 2}  # unpublished
    reply = fleet.command("pi-01", "deploy", args, timeout=1)
    assert not reply["ok"] and "did not arrive within 2 s" in reply["error"]
