"""docs/protocol.md against the code: its shell example pings a real agent, as written.

The worked example is extracted from the page and run with bash, its settings (broker port,
fleet, device, key file, sender) given through the environment variables the script reads,
against an in-process :class:`edge_agent.agent.Agent` on a real Mosquitto. The reply it prints
is then verified here with the protocol module.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.learning import NOT_LEARNING, WRONG_MODEL
from edge_agent.protocol import (
    BAD_REQUEST,
    COMMANDS,
    DROP_REASONS,
    MISADDRESSED,
    SCHEMA_VERSION,
    Command,
    FrameKind,
    FrameVerifier,
    Keyring,
    Topics,
    expect_json,
    parse_reply,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "protocol.md"
MARK = "<!-- example: ping"
TOOLS = ("bash", "mosquitto_pub", "mosquitto_sub", "openssl", "od", "sed")


def ping_script() -> str:
    """The shell block that follows the example marker in docs/protocol.md."""
    text = DOC.read_text()
    assert text.count(MARK) == 1, f"docs/protocol.md must hold one {MARK!r} marker"
    after = text.split(MARK, 1)[1].split("-->", 1)[1]
    match = re.match(r"\s*```sh\n(.*?)\n```\n", after, re.S)
    assert match, "the example marker must be followed by a ```sh block"
    return match.group(1) + "\n"


@pytest.fixture
def agent(mosquitto, tmp_path):
    """An agent ``pi-07`` of fleet ``docs`` with no model: enough to answer a ping."""
    key_file = tmp_path / "fleet.key"
    # every byte value a shell could mangle: NUL, newline, quote, backslash, high bytes
    key_file.write_bytes(bytes([0, 10, 34, 92, 255]) + bytes(range(32, 91)))
    config = AgentConfig(
        broker=mosquitto.url,
        fleet="docs",
        id="pi-07",
        state_dir=str(tmp_path / "state"),
        key_file=str(key_file),
        http_port=0,
        heartbeat_s=5.0,
    )
    made = Agent(config)
    made.start(connect_timeout=10)
    try:
        assert made.transport.wait_subscribed(10)
        yield made
    finally:
        made.shutdown()


def run_example(
    mosquitto, agent: Agent, cwd: Path, *, key_file: str | None = None, timeout_s: int = 10
) -> subprocess.CompletedProcess[str]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, f"the example needs {missing} on PATH (apt-get install mosquitto-clients)"
    script = cwd / "ping.sh"
    script.write_text(ping_script())
    env = {
        **os.environ,
        "MQTT_HOST": "127.0.0.1",
        "MQTT_PORT": str(mosquitto.port),
        "FLEET": agent.config.fleet,
        "DEVICE": agent.config.id,
        "KEY_FILE": key_file or agent.config.key_file,
        "SENDER": "doc-reader",
        "TIMEOUT_S": str(timeout_s),
    }
    return subprocess.run(
        ["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_shell_example_pings_a_real_agent(mosquitto, agent, tmp_path):
    done = run_example(mosquitto, agent, tmp_path)
    assert done.returncode == 0, (done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[1] == "reply signature ok", done.stdout
    # the reply, checked as the laptop checks it
    frame = FrameVerifier(Keyring.from_file(agent.config.key_file)).open(lines[0].encode())
    reply = parse_reply(expect_json(frame, FrameKind.REPLY))
    assert frame.sender == "pi-07"
    assert reply.ok and reply.name == Command.PING and reply.result["pong"] is True
    assert isinstance(reply.id, str) and re.fullmatch(r"sh-[0-9a-f]{32}", reply.id)
    assert sum(agent.drop_counts().values()) == 0


def test_the_shell_example_with_a_wrong_key_gets_no_reply(mosquitto, agent, tmp_path):
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"w" * 32)
    done = run_example(mosquitto, agent, tmp_path, key_file=str(wrong), timeout_s=2)
    assert done.returncode == 1 and done.stdout == ""
    assert "no reply from pi-07 within 2 s" in done.stderr
    assert agent.drop_counts()["forged"] == 1


def test_the_page_names_every_command_and_drop_reason():
    text = DOC.read_text()
    for name in COMMANDS:
        assert f"| `{name}` |" in text, f"docs/protocol.md: no row for command {name!r}"
    others = (BAD_REQUEST, MISADDRESSED, NOT_LEARNING, WRONG_MODEL, "chunk_overflow")
    for reason in (*DROP_REASONS, *others, "chunk_timeout"):
        assert f"`{reason}`" in text, f"docs/protocol.md never names drop reason {reason!r}"
    assert f"(version {SCHEMA_VERSION})" in text.splitlines()[0]
    assert f'"v":{SCHEMA_VERSION},"type":"cmd"' in ping_script()
    topics = Topics("lab")
    for topic in (topics.state("x"), topics.cmd("x"), topics.reply("x"), topics.gossip("x")):
        assert topic.replace("lab", "<fleet>").replace("/x/", "/<id>/") in text
