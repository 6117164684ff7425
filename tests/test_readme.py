"""Every README snippet after the two set-up blocks runs as written, in order, in an empty folder.

The ```bash blocks run in one shell, as a reader types them into one terminal: a daemon that one
block starts with ``&`` is stopped by a later block with ``kill %N``. The shell runs with
``set -e -o pipefail``, so any failing command fails its block. The ```python blocks run in
one namespace in this process, in the same folder, so they see the files the shell made.

Only :func:`smaller`, an explicit table of substitutions, changes the text: fewer epochs,
rounds and nodes, narrower networks, smaller inputs, free ports, and the one repository file
the tour reads. Each substitution must apply somewhere, so the table cannot silently go stale.
The whole README then runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.broker import free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK_TIMEOUT_S = 900.0  # a hang (a daemon that never answers) fails; a busy machine does not

_FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    index: int  # 1-based, among the bash and python blocks of README.md
    line: int
    lang: str
    code: str

    def describe(self) -> str:
        return f"README block {self.index} ({self.lang}, line {self.line})"


def readme_blocks() -> list[Block]:
    """The ```bash and ```python blocks of README.md, in order."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        lang = match.group(1)
        if lang in ("bash", "python"):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(Block(len(blocks) + 1, line, lang, match.group(2)))
    return blocks


def smaller(broker_port: int, http_port: int) -> list[tuple[str, str]]:
    """(regex, replacement) applied in order to every block: small settings, free ports."""
    return [
        # one epoch per run; the resumed run must go on past the first run's epochs
        (r"--epochs (?!12\b)\d+", "--epochs 1"),
        (r"--epochs 12\b", "--epochs 2"),
        (r"\bepochs=\d+", "epochs=1"),
        # the CIFAR-stem ResNets train at ~20 s an epoch at full width, ~1 s at 1/8
        (r"(bitfleet train --model (?:bireal18|resnet18) --dataset digits)", r"\1 --width 0.125"),
        # a data-free compression: a one-epoch search, a few generator and student steps
        (r"(bitfleet compress \S+)", r"\1 --search-epochs 1 --generator-steps 5 --steps 5"),
        (r"--input-size 224\b", "--input-size 64"),
        (r"--threads 1,2\b", "--threads 1"),
        (r"--nodes \d+", "--nodes 10"),  # rrg:8 needs more than 8 nodes
        (r"--rounds \d+", "--rounds 2"),
        (r"\b1883\b", str(broker_port)),
        (r"\b8765\b", str(http_port)),
        (r"(?<![\w/])ops/agent\.toml\b", str(REPO / "ops" / "agent.toml")),
    ]


def shrink(blocks: list[Block], rules: list[tuple[str, str]]) -> list[Block]:
    hits = {pattern: 0 for pattern, _ in rules}
    out = []
    for block in blocks:
        code = block.code
        for pattern, replacement in rules:
            code, count = re.subn(pattern, replacement, code)
            hits[pattern] += count
        out.append(Block(block.index, block.line, block.lang, code))
    stale = [pattern for pattern, count in hits.items() if not count]
    assert not stale, f"substitutions that match nothing in README.md any more: {stale}"
    return out


class Shell:
    """One bash process reading commands from a pipe, in its own process group."""

    def __init__(self, cwd: Path, scratch: Path) -> None:
        self.scratch = scratch
        self.log_path = scratch / "shell.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc", "-s"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.send("set -e -o pipefail")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def run(self, name: str, code: str, timeout: float = BLOCK_TIMEOUT_S) -> str | None:
        """Source ``code`` in the shell; None when it finished, else why it did not."""
        if self.proc.poll() is not None:
            return f"the shell had already exited with status {self.proc.returncode}"
        script = self.scratch / f"{name}.sh"
        done = self.scratch / f"{name}.done"
        script.write_text(code, encoding="utf-8")
        # stdin from /dev/null: a command in the block must not read the shell's own input
        self.send(f"source '{script}' </dev/null")
        self.send(f": > '{done}'")
        deadline = time.monotonic() + timeout
        while not done.exists():
            if self.proc.poll() is not None:
                return f"the shell exited with status {self.proc.returncode}"
            if time.monotonic() > deadline:
                return f"still running after {timeout:g} s"
            time.sleep(0.1)
        return None

    def tail(self, chars: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def close(self) -> None:
        """End the shell and whatever it left running (its whole process group)."""
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
                time.sleep(0.2)  # let the group's other members go too
            except subprocess.TimeoutExpired:
                continue
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self._log.close()


@pytest.fixture
def shell(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shell]:
    sh = Shell(tmp_path, tmp_path_factory.mktemp("readme-shell"))
    yield sh
    sh.close()


def test_readme_extraction_finds_the_setup_blocks_first() -> None:
    blocks = readme_blocks()
    assert len(blocks) > 2
    assert blocks[0].lang == blocks[1].lang == "bash"
    assert "pip install" in blocks[0].code and "bitfleet demo" in blocks[0].code
    assert "python -m pytest" in blocks[1].code


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_readme_snippets_run_in_order(
    tmp_path: Path, shell: Shell, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = shrink(readme_blocks()[2:], smaller(free_port(), free_port()))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for block in blocks:
        started = time.monotonic()
        if block.lang == "bash":
            failure = shell.run(f"block{block.index}", block.code)
            if failure is not None:
                pytest.fail(
                    f"{block.describe()} failed: {failure}\n--- the block as run ---\n"
                    f"{block.code}--- shell output (tail) ---\n{shell.tail()}",
                    pytrace=False,
                )
        else:
            try:
                exec(compile(block.code, f"<{block.describe()}>", "exec"), namespace)
            except (Exception, SystemExit):  # sys.exit() in a snippet fails it too
                pytest.fail(
                    f"{block.describe()} failed:\n--- the block as run ---\n{block.code}"
                    f"--- traceback ---\n{traceback.format_exc()}",
                    pytrace=False,
                )
        print(f"{block.describe()}: {time.monotonic() - started:.1f} s")
    # the README stops every daemon it starts
    failure = shell.run("leftovers", 'test -z "$(jobs -pr)"')
    assert failure is None, (
        "README leaves background jobs running after its last block\n" + shell.tail()
    )
