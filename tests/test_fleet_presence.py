"""`bitfleet fleet ls` sees real agent daemons come and go, on Mosquitto and the embedded broker.

A daemon killed with SIGKILL says nothing: the broker notices the dead connection and publishes
the device's last will (the retained ``offline`` state), and the listing follows it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_support import daemon_args
from fleet_cli_support import flags, fleet_cli

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("no_user_settings")


def _ls_json(url: str, key_file: Path) -> dict[str, str]:
    result = fleet_cli("ls", "--json", "--wait", "0", *flags(url, key_file))
    assert result.exit_code == 0, result.output
    return {row["id"]: row["status"] for row in json.loads(result.stdout)}


def _until_listed(url: str, key_file: Path, expected: dict[str, str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    seen = _ls_json(url, key_file)
    while seen != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = _ls_json(url, key_file)
    return seen


def test_ls_sees_daemons_come_and_a_killed_one_go(broker, key_file, artifact, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edge_agent.cli",
                "run",
                *daemon_args(
                    broker.url,
                    key_file,
                    tmp_path / device,
                    "--artifact",
                    str(artifact),
                    device=device,
                ),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for device in ("pi-01", "pi-02")
    ]
    try:
        both = {"pi-01": "online", "pi-02": "online"}
        assert _until_listed(broker.url, key_file, both, timeout=60) == both
        processes[0].send_signal(signal.SIGKILL)
        processes[0].wait(timeout=10)
        killed = {"pi-01": "offline", "pi-02": "online"}
        # the broker sees the socket close at once; the keepalive (1.5 x 30 s) bounds the rest
        assert _until_listed(broker.url, key_file, killed, timeout=15) == killed
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)
