"""The agent's recent log lines, kept in memory for the ``logs`` command.

A device in a field rarely has a shell an operator can reach, but it has the fleet's MQTT
connection: ``bitfleet fleet logs pi-01`` asks the agent for its latest lines, which this
handler keeps in a ring buffer (the last :data:`CAPACITY`, formatted like the daemon's console).

The buffer sits on the root logger and keeps INFO and above of what the process's loggers let
through. The daemon (:mod:`edge_agent.daemon`) lets INFO through whatever ``--log-level`` says
and applies that level to the console alone, so a device started with ``--log-level warning``
still answers ``logs`` with what it did.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

__all__ = ["CAPACITY", "LogBuffer"]

CAPACITY = 1000
"""Lines kept, and the most the ``logs`` command returns."""

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class LogBuffer(logging.Handler):
    """A logging handler that keeps the latest ``capacity`` formatted lines."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
        self._lines: deque[str] = deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad log call must not break the caller
            self.handleError(record)
            return
        with self._guard:
            self._lines.append(text)

    def lines(self, count: int) -> list[str]:
        """The latest ``count`` lines, oldest first."""
        with self._guard:
            return list(self._lines)[-count:] if count > 0 else []

    def attach(self) -> None:
        """Start recording (a handler on the root logger)."""
        logging.getLogger().addHandler(self)

    def detach(self) -> None:
        """Stop recording (the lines stay readable)."""
        logging.getLogger().removeHandler(self)
