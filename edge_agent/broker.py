"""Real MQTT brokers on a free loopback port, for tests and for ``python -m edge_agent.broker``.

bitfleet talks to a real broker (docs/design.md, section 5), so its tests do too: no mocks. Two
kinds are started here, both as child processes listening on ``127.0.0.1`` only::

    from edge_agent.broker import EmbeddedBroker, MosquittoBroker, mosquitto_available

    with MosquittoBroker() as broker:          # needs the mosquitto binary
        transport = MqttTransport(url=broker.url, client_id="pi-01")
        ...
        broker.restart()                       # same port: clients must reconnect on their own

    with EmbeddedBroker() as broker:           # pure Python (amqtt), MQTT 3.1.1 only
        ...

- :class:`MosquittoBroker` writes a throwaway config (listener, authentication, ACL, packet size
  limit, no persistence) into a temporary directory and runs ``mosquitto -c``. Give it a
  ``password_file`` (see :func:`write_password_file`) and an ``acl_file`` to run the shipped
  ``ops/mosquitto/bitfleet.acl`` for real; anonymous clients are then refused.
- :class:`EmbeddedBroker` runs amqtt, the zero-setup default, in a child Python process
  (``python -m edge_agent.broker --port N``). A child process rather than a thread with its own
  asyncio loop, because: a restart must drop every client connection the way a crashed broker
  does, which killing a process does exactly and an in-process shutdown only approximately; an
  amqtt bug or a blocked event loop cannot stall or crash the caller (the paho clients under
  test share a GIL with a broker thread, the agent would too); and the broker to run by hand,
  ``python -m edge_agent.broker``, is the same process anyway. It costs about 0.2 s of
  interpreter start-up.

Both wait until the port accepts TCP connections before returning, fail with the broker's own
log in the message if it exits early, and expose :attr:`~_BrokerProcess.url`,
:meth:`~_BrokerProcess.stop` and :meth:`~_BrokerProcess.restart`. A broker that keeps no
persistence forgets retained messages when it restarts, so clients re-publish their retained
state from a connect hook (see :mod:`edge_agent.transport`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from bitfleet.errors import BitfleetError, MissingExtraError, require
from bitfleet.fsutil import atomic_write_secret

__all__ = [
    "BrokerError",
    "EmbeddedBroker",
    "MosquittoBroker",
    "free_port",
    "is_loopback",
    "mosquitto_available",
    "mosquitto_binary",
    "serve",
    "write_password_file",
]

_HOST = "127.0.0.1"
# What the embedded broker prints once it listens.
_READY = "amqtt broker listening on"
# How many times start() picks a new free port when another process took the one it chose.
_PORT_ATTEMPTS = 3


_B = TypeVar("_B", bound="_BrokerProcess")


class BrokerError(BitfleetError, RuntimeError):
    """A broker that could not be started (its log is in the message)."""


def free_port(host: str = _HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# Debian and Ubuntu install the broker in /usr/sbin, which is not on every user's PATH (nor in
# a minimal container's); a source build goes to /usr/local/sbin.
_SBIN_DIRS: tuple[str, ...] = ("/usr/sbin", "/usr/local/sbin")


def _find_tool(name: str) -> str | None:
    """``name`` on ``PATH``, else in :data:`_SBIN_DIRS`: its path, or None."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


def mosquitto_binary() -> str | None:
    """The ``mosquitto`` binary: on ``PATH``, else in /usr/sbin or /usr/local/sbin; or None."""
    return _find_tool("mosquitto")


def mosquitto_available() -> bool:
    """Whether the ``mosquitto`` broker binary is installed (see :func:`mosquitto_binary`)."""
    return mosquitto_binary() is not None


def write_password_file(path: str | os.PathLike[str], users: Mapping[str, str]) -> Path:
    """Write a Mosquitto password file for ``users`` (name -> password), atomically, mode 0600.

    The file is replaced and holds salted ``$7$`` hashes only, made as ``mosquitto_passwd``
    makes them (:func:`edge_agent.broker_access.hash_password`), so it needs no Mosquitto and
    no password ever appears on a command line. Raises ``ValueError`` for an empty user name
    or one holding ':'.
    """
    from edge_agent.broker_access import hash_password

    lines = []
    for name, password in users.items():
        if not name or ":" in name:
            raise ValueError(f"bad user name {name!r}: must be non-empty without ':'")
        lines.append(f"{name}:{hash_password(password)}\n")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_secret(target, "".join(lines).encode("utf-8"))
    return target


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, wait, then SIGKILL: used by stop() and at interpreter exit."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _BrokerProcess:
    """A broker running as a child process on ``127.0.0.1:<port>``; see the subclasses."""

    name = "broker"

    def __init__(self, *, port: int | None = None, start_timeout: float = 10.0) -> None:
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.start_timeout = start_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix=f"bitfleet-{self.name}-")
        self.workdir = Path(self._tmp.name)
        self.log_path = self.workdir / "broker.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    # -- what subclasses provide ------------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None

    def _ready(self, log_offset: int) -> bool:
        """Whether the broker serves; ``log_offset`` is where this run's log starts."""
        return _port_open(_HOST, self.port)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The broker's address for :class:`~edge_agent.transport.MqttTransport`."""
        return f"mqtt://{_HOST}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    def log(self) -> str:
        """Everything the broker wrote to its log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self: _B) -> _B:
        """Start the broker and wait until its port accepts connections; returns ``self``.

        Raises :class:`BrokerError` (with the end of the broker's log) if it exits or does not
        listen within ``start_timeout`` seconds. When the port was picked automatically and was
        taken in the meantime, a new one is tried.
        """
        if self.running:
            return self
        for attempt in range(_PORT_ATTEMPTS):
            try:
                self._spawn()
                return self
            except BrokerError:
                if self._fixed_port or attempt == _PORT_ATTEMPTS - 1 or "in use" not in self.log():
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        command = self._command()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,  # the embedded broker exits when this pipe closes
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.workdir,
            )
        # Never leave an orphan broker behind, even if stop() is not called.
        self._finalizer = weakref.finalize(self, _stop_process, self._proc)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"{self.name} exited with status {self._proc.returncode} before listening "
                    f"on {_HOST}:{self.port}; its log:\n{self._log_tail()}"
                )
            if self._ready(log_offset):
                return
            time.sleep(0.02)
        _stop_process(self._proc)
        raise BrokerError(
            f"{self.name} did not listen on {_HOST}:{self.port} within {self.start_timeout:g} s; "
            f"its log:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(empty)"

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 5 s). Clients see the connection drop."""
        if self._proc is not None:
            _stop_process(self._proc)
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def kill(self) -> None:
        """Kill the broker with SIGKILL, as a crash or power loss of the broker host would."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
        self.stop()

    def restart(self) -> None:
        """Stop the broker and start it again on the same port (non-persistent state is lost)."""
        self.stop()
        self._fixed_port = True
        self.start()

    def close(self) -> None:
        """Stop the broker and delete its temporary directory."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self: _B) -> _B:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"{type(self).__name__}(url={self.url!r}, {state})"


class MosquittoBroker(_BrokerProcess):
    """Mosquitto on ``127.0.0.1:<port>`` with a generated config (MQTT 3.1.1 and 5).

    Args:
        port: port to listen on; a free one by default.
        password_file: a Mosquitto password file (:func:`write_password_file`); setting it, or
            ``acl_file``, turns anonymous access off.
        acl_file: a Mosquitto ACL file, such as ``ops/mosquitto/bitfleet.acl``.
        allow_anonymous: let clients connect without a user name; defaults to True unless a
            password or ACL file is given.
        max_packet_size: largest MQTT packet in bytes the broker accepts (whole packet, header
            included); Mosquitto's default has no limit beyond the protocol's 256 MB.
        extra_config: more ``mosquitto.conf`` lines, appended as they are.
        start_timeout: seconds to wait for the listener.
    """

    name = "mosquitto"

    def __init__(
        self,
        *,
        port: int | None = None,
        password_file: str | os.PathLike[str] | None = None,
        acl_file: str | os.PathLike[str] | None = None,
        allow_anonymous: bool | None = None,
        max_packet_size: int | None = None,
        extra_config: str = "",
        start_timeout: float = 10.0,
    ) -> None:
        super().__init__(port=port, start_timeout=start_timeout)
        self.password_file = Path(password_file).resolve() if password_file else None
        self.acl_file = Path(acl_file).resolve() if acl_file else None
        if allow_anonymous is None:
            allow_anonymous = self.password_file is None and self.acl_file is None
        self.allow_anonymous = allow_anonymous
        self.max_packet_size = max_packet_size
        self.extra_config = extra_config
        self.config_path = self.workdir / "mosquitto.conf"

    def config_text(self) -> str:
        """The ``mosquitto.conf`` this broker runs with."""
        lines = [
            "# written by edge_agent.broker.MosquittoBroker",
            f"listener {self.port} {_HOST}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "persistence false",
            # small frames (replies, acks) go out at once instead of waiting ~40 ms for Nagle
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if os.geteuid() == 0:
            # Run as root, Mosquitto drops to the 'mosquitto' user, which could not read the
            # password and ACL files in our private temporary directory: stay root (tests only).
            lines.append("user root")
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.max_packet_size is not None:
            lines.append(f"max_packet_size {int(self.max_packet_size)}")
        if self.extra_config:
            lines.append(self.extra_config.rstrip("\n"))
        return "\n".join(lines) + "\n"

    def _command(self) -> list[str]:
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError(
                "mosquitto not found on PATH, in /usr/sbin or /usr/local/sbin "
                "(apt install mosquitto)"
            )
        self.config_path.write_text(self.config_text())
        return [binary, "-c", str(self.config_path)]


class EmbeddedBroker(_BrokerProcess):
    """The pure-Python amqtt broker (MQTT 3.1.1 only, anonymous) in a child process.

    The child runs ``python -m edge_agent.broker --port N --exit-on-stdin-eof``: it shuts down
    on SIGTERM/SIGINT, and also when the parent's end of its stdin pipe closes, so a test run
    that dies leaves no broker behind.
    """

    name = "amqtt"

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "edge_agent.broker",
            "--host",
            _HOST,
            "--port",
            str(self.port),
            "--exit-on-stdin-eof",
        ]

    def _ready(self, log_offset: int) -> bool:
        # amqtt logs an error for every connection that sends no CONNECT, so instead of probing
        # the port, wait for the line the child prints once its listener is up.
        with open(self.log_path, "rb") as log:
            log.seek(log_offset)
            return _READY.encode() in log.read()

    def _env(self) -> dict[str, str]:
        # Make `-m edge_agent.broker` importable wherever the caller's working directory is.
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env


# -- the embedded broker process ---------------------------------------------------------------


def amqtt_config(
    host: str,
    port: int,
    password_file: str | os.PathLike[str] | None = None,
    acl_file: str | os.PathLike[str] | None = None,
) -> dict:
    """The amqtt 0.12 broker config: one TCP listener, no ``$SYS`` publisher.

    Access is anonymous, or checked against Mosquitto's password (and ACL) files through
    :mod:`edge_agent.broker_access`.

    amqtt 0.12 takes a dict that maps plugin class paths to their options (older versions used
    ``auth``/``topic-check`` sections, which 0.12 still reads but deprecates).
    """
    plugins: dict[str, dict[str, str | bool]] = {}
    if password_file is None:
        plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
    else:
        plugins["edge_agent.broker_access.MosquittoPasswordPlugin"] = {
            "password_file": str(password_file)
        }
    if acl_file is not None:
        plugins["edge_agent.broker_access.MosquittoAclPlugin"] = {"acl_file": str(acl_file)}
    return {"listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}}, "plugins": plugins}


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(
    host: str,
    port: int,
    exit_on_stdin_eof: bool,
    password_file: str | None = None,
    acl_file: str | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run the embedded amqtt broker until SIGTERM/SIGINT (or, if asked, EOF on stdin).

    ``on_ready`` is called once the listener is up; password and ACL files are Mosquitto's.
    """
    import asyncio

    from amqtt.broker import Broker

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if exit_on_stdin_eof:
        # The parent holds the write end of our stdin pipe; EOF means it closed it or died.
        def on_stdin() -> None:
            if not os.read(sys.stdin.fileno(), 4096):
                loop.remove_reader(sys.stdin.fileno())
                stop.set()

        loop.add_reader(sys.stdin.fileno(), on_stdin)
    broker = Broker(amqtt_config(host, port, password_file, acl_file))
    await broker.start()
    print(f"{_READY} mqtt://{host}:{port}", file=sys.stderr, flush=True)
    if on_ready is not None:
        on_ready()
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Run the embedded amqtt broker in the foreground until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m edge_agent.broker",
        description="Run the embedded pure-Python MQTT 3.1.1 broker (amqtt), anonymous access.",
    )
    parser.add_argument("--host", default=_HOST, help="address to listen on (default loopback)")
    parser.add_argument("--port", type=int, default=1883, help="TCP port (default 1883)")
    parser.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="shut down when stdin closes (used when a parent process owns the broker)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log amqtt at INFO level")
    args = parser.parse_args(argv)
    try:
        require("amqtt", "train", "the embedded broker")
    except MissingExtraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    import asyncio
    import logging

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("transitions").setLevel(logging.WARNING)
    asyncio.run(serve(args.host, args.port, args.exit_on_stdin_eof))
    return 0


if __name__ == "__main__":
    sys.exit(main())
