"""A device that only serves installs the base package: no torch, and the agent still serves.

The test builds a fresh virtual environment, installs bitfleet into it with no extras (from a
copy of this source tree, as `pip install bitfleet` would on a Raspberry Pi), and checks that
torch, numba and scikit-learn are absent, that the native kernels were built, that
`bitfleet-agent run` serves an artifact over a real Mosquitto and answers inference, and that
commands needing an extra say which one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from install_support import copy_source

import exporters
import models
from toolkit.fleet import FleetClient

FLEET = "base"


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    """A new venv with `pip install <this tree>` and no extras."""
    root = tmp_path_factory.mktemp("base")
    source = root / "src"
    copy_source(source)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    return venv


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=venv.parent,  # never the checkout: only the installed package may be found
    )


@pytest.mark.slow
def test_base_install_has_no_torch_and_the_agent_serves(base_venv, mosquitto, tmp_path):
    missing = _run(
        base_venv,
        "python",
        "-c",
        "import importlib.util as u; print([m for m in ('torch', 'numba', 'sklearn', 'onnx') "
        "if u.find_spec(m)])",
    )
    assert missing.stdout.strip() == "[]", missing.stdout + missing.stderr

    artifact = exporters.export(
        models.create("lenet5").eval(),
        tmp_path / "art",
        "onnx-portable",
        name="digits",
        version="1",
        input_shape=(1, 32, 32),
    )
    key = tmp_path / "fleet.key"
    key.write_bytes(os.urandom(32))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    process = subprocess.Popen(
        [
            str(base_venv / "bin" / "bitfleet-agent"),
            "run",
            "--broker",
            mosquitto.url,
            "--fleet",
            FLEET,
            "--id",
            "pi-base",
            "--state-dir",
            str(tmp_path / "state"),
            "--artifact",
            str(artifact),
            "--key-file",
            str(key),
            "--http-port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with FleetClient(mosquitto.url, fleet=FLEET, key_file=key) as fleet:
            online = fleet.wait_for(
                lambda d: d.get("pi-base", {}).get("status") == "online", timeout=60
            )
            assert online, "the base-install agent never came online"
            batch = np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)
            reply = fleet.infer("pi-base", batch, timeout=30)
            assert reply["ok"], reply
            assert np.asarray(reply["result"]["logits"]).shape == (2, 10)
            telemetry = fleet.command("pi-base", "status", timeout=30)["result"]["telemetry"]
            assert telemetry["torch_loaded"] is False
            # the install compiled the native kernels (gcc is here): the device reports its set
            assert telemetry["kernels_isa"] not in ("numpy", None), telemetry
            # learning needs the `learn` extra: an error reply naming it, and serving goes on
            learn = fleet.command("pi-base", "learn.start", timeout=30)
            assert not learn["ok"] and "pip install 'bitfleet[learn]'" in learn["error"], learn
            assert fleet.infer("pi-base", batch, timeout=30)["ok"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        output = process.stdout.read().decode() if process.stdout else ""
        assert "Traceback" not in output, output


@pytest.mark.slow
def test_base_install_names_the_extra_a_command_needs(base_venv):
    result = _run(base_venv, "bitfleet", "models")
    assert result.returncode == 1
    assert "pip install 'bitfleet[train]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert _run(base_venv, "bitfleet", "--help").returncode == 0
    broker = _run(base_venv, "python", "-m", "edge_agent.broker", "--port", "0")
    assert broker.returncode == 1
    assert "pip install 'bitfleet[train]'" in broker.stderr and "Traceback" not in broker.stderr


@pytest.mark.slow
def test_base_install_runs_the_fast_flavour(base_venv, tmp_path):
    """The fast flavour needs no extra: the native kernels, ORT, and bitfleet's graph reader."""
    net = models.create("bireal18", stem="imagenet", width=0.125, in_channels=1).eval()
    artifact = exporters.export(net, tmp_path / "fast", "onnx", input_shape=(1, 32, 32))
    batch = np.random.default_rng(3).standard_normal((2, 1, 32, 32)).astype(np.float32)
    np.save(tmp_path / "batch.npy", batch)
    probe = (
        "import sys, numpy as np\n"
        "from exporters import kernels, runtime\n"
        "p = runtime.load(sys.argv[1])\n"
        "np.save(sys.argv[3], p.predict(np.load(sys.argv[2])))\n"
        "gone = ('onnx', 'numba', 'torch')\n"
        "print(kernels.backend(), sorted(m for m in gone if m in sys.modules))\n"
    )
    out = tmp_path / "logits.npy"
    result = _run(
        base_venv, "python", "-c", probe, str(artifact), str(tmp_path / "batch.npy"), str(out)
    )
    assert result.returncode == 0, result.stderr
    isa, loaded = result.stdout.split(" ", 1)
    assert isa != "numpy" and loaded.strip() == "[]", result.stdout
    from exporters import runtime

    np.testing.assert_array_equal(np.load(out), runtime.load(artifact).predict(batch))
