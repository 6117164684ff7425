"""The agent process itself, started by ``bitfleet-agent run`` in a fresh interpreter.

``bitfleet-agent run`` parses its command line with typer, which brings click and pydantic
along: about 13 MB that a daemon serving a model on a 512 MB board would carry for its whole
life while never parsing another argument. So the CLI hands the parsed flags to this module
through an inherited pipe and execs ``python -m edge_agent.daemon --config-fd N``. The
process keeps its PID (systemd, the last will and ``kill`` see no difference), its environment
and its standard streams; only the interpreter's memory starts over. Where ``exec`` is not
available (or the CLI runs inside another program, such as a test's ``CliRunner``),
:func:`serve` runs in the same process instead.

Everything here is standard library plus the agent: no typer, no torch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["exec_daemon", "serve"]

_LOG_LEVELS = ("debug", "info", "warning", "error")
# a pipe holds at least this much without a reader (Linux: 64 KiB), so writing never blocks
_PIPE_ROOM = 60_000


def serve(
    config_path: str | None, flags: dict[str, Any], log_level: str = "info", debug: bool = False
) -> int:
    """Load the settings, run the agent until SIGTERM/SIGINT; the exit code.

    Every expected failure (a :class:`~bitfleet.errors.BitfleetError`: bad settings, unreadable
    state or artifact, unreachable broker, another agent with this device id; or the operating
    system refusing a file) prints one ``error:`` line on stderr and returns 1; with ``debug``
    (``bitfleet-agent --debug``) it is raised with its traceback instead. Anything else is a bug
    and keeps its traceback.
    """
    if log_level.lower() not in _LOG_LEVELS:
        return _fail(f"unknown log level {log_level!r}; use one of {', '.join(_LOG_LEVELS)}")
    # INFO reaches the agent's log buffer (the `logs` command); --log-level filters the console
    level = logging.getLevelName(log_level.upper())
    logging.basicConfig(
        level=min(level, logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    from bitfleet.errors import BitfleetError
    from edge_agent.agent import Agent
    from edge_agent.config import load_config

    try:
        agent = Agent(load_config(Path(config_path) if config_path else None, flags=flags))
        return agent.run()
    except (BitfleetError, OSError) as err:
        if debug:
            raise
        text = str(err).strip()
        return _fail(text.splitlines()[0] if text else type(err).__name__)


def exec_daemon(
    config_path: str | None, flags: dict[str, Any], log_level: str, debug: bool = False
) -> None:
    """Replace this process with a fresh ``python -m edge_agent.daemon`` (POSIX only).

    Returns only if it cannot exec (not POSIX, or settings too large for a pipe): the caller
    then runs :func:`serve` itself.
    """
    settings = {"config": config_path, "flags": flags, "log_level": log_level, "debug": debug}
    payload = json.dumps(settings)
    if os.name != "posix" or len(payload.encode()) > _PIPE_ROOM:
        return
    read_end, write_end = os.pipe()
    os.write(write_end, payload.encode())
    os.close(write_end)
    os.set_inheritable(read_end, True)
    # run this very copy of the package, wherever it was imported from
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", "edge_agent.daemon", "--config-fd", str(read_end)]
    os.execve(sys.executable, argv, env)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 1


def _read_settings(argv: list[str]) -> dict[str, Any]:
    if len(argv) != 2 or argv[0] != "--config-fd" or not argv[1].isdigit():
        raise ValueError(
            "usage: python -m edge_agent.daemon --config-fd N (started by bitfleet-agent run; "
            "run that instead)"
        )
    with os.fdopen(int(argv[1]), "rb") as pipe:
        settings = json.loads(pipe.read())
    if not isinstance(settings, dict) or not isinstance(settings.get("flags"), dict):
        raise ValueError("the settings from bitfleet-agent run are malformed")
    return settings


def main(argv: list[str] | None = None) -> int:
    try:
        settings = _read_settings(sys.argv[1:] if argv is None else argv)
    except (OSError, ValueError) as err:
        return _fail(str(err))
    return serve(
        settings.get("config"),
        settings["flags"],
        settings.get("log_level", "info"),
        debug=bool(settings.get("debug", False)),
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
