"""The agent's local HTTP endpoint, for apps on the device (loopback only).

``GET /health`` says whether a model is loaded, ``GET /status`` returns the telemetry, and
``POST /infer`` with ``{"inputs": N x C x H x W nested lists}`` (or ``{"inputs": {"b64":
float32 bytes, "shape": [...]}}``) returns the same ``{"logits", "top1", "latency_ms"}`` as an
inference request over MQTT. It binds 127.0.0.1 only: the fleet reaches the device through the
broker, where every frame is signed; this port is for processes on the same machine.

Every answer is strict JSON: a batch holding NaN or Inf (which Python's ``json`` writes and reads
as ``NaN`` and ``Infinity``), or a model answering with non-finite logits, is a 400 with a JSON
``error``, checked by :meth:`edge_agent.serving.ModelServer.infer` as over MQTT; and a body that
still could not be written as JSON would be a 500 with a JSON ``error``, never a ``NaN``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bitfleet.errors import BitfleetError
from edge_agent.config import ConfigError
from edge_agent.protocol import parse_infer

__all__ = ["start_http_server", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 8 * 1024 * 1024


def start_http_server(agent: Any, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve ``agent`` on ``host:port`` in a daemon thread; ``shutdown()`` stops it.

    Raises :class:`~edge_agent.config.ConfigError` when the port cannot be bound (in use).
    """

    class Handler(BaseHTTPRequestHandler):
        server_version = "bitfleet-agent"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            pass  # requests are not worth a log line each on a device

        def _send(self, status: int, body: dict[str, Any]) -> None:
            try:
                data = json.dumps(body, allow_nan=False).encode()
            except (TypeError, ValueError) as err:  # a bug: still answer in JSON
                status = 500
                problem = f"internal error: the answer is not JSON ({err})"
                data = json.dumps({"error": problem}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - stdlib hook name
            if self.path == "/health":
                ok = agent.predictor is not None
                self._send(
                    200 if ok else 503,
                    {
                        "status": "ok" if ok else "no model",
                        "model": agent.artifact.name if ok else None,
                    },
                )
            elif self.path == "/status":
                self._send(200, agent.telemetry())
            else:
                self._send(404, {"error": "unknown path; use /health, /status or POST /infer"})

        def do_POST(self) -> None:  # noqa: N802 - stdlib hook name
            if self.path != "/infer":
                self._send(404, {"error": "unknown path; POST /infer"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 < length <= MAX_BODY_BYTES:
                self._send(
                    413 if length > 0 else 400,
                    {"error": f"send a JSON body of at most {MAX_BODY_BYTES} bytes"},
                )
                return
            try:
                result = agent.infer(parse_infer(json.loads(self.rfile.read(length))).inputs)
            except (BitfleetError, ValueError) as err:  # JSON and UTF-8 errors are ValueErrors
                self._send(400, {"error": str(err).splitlines()[0]})
                return
            self._send(200, result)

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as err:
        raise ConfigError(
            f"cannot serve HTTP on {host}:{port} ({err.strerror or err}); pick another "
            "--http-port, or 0 to turn it off"
        ) from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="bitfleet-http", daemon=True).start()
    return server
