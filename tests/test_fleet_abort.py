"""A command waiting for a device that will never answer can be abandoned at once."""

from __future__ import annotations

import threading
import time

import pytest

from toolkit.fleet import FleetError


def test_abort_pending_wakes_a_waiting_command(fleet):
    outcome: dict[str, object] = {}

    def ask() -> None:
        started = time.monotonic()
        try:
            fleet.command("pi-gone", "ping", timeout=30)
        except FleetError as err:
            outcome["error"] = str(err)
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=ask)
    thread.start()
    deadline = time.monotonic() + 5
    while not fleet._replies and time.monotonic() < deadline:  # the request is in flight
        time.sleep(0.01)
    fleet.abort_pending("interrupted")
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert outcome["seconds"] < 5
    assert outcome["error"] == "ping to pi-gone abandoned: interrupted"
    # nothing left waiting, and the client still works
    with pytest.raises(FleetError, match="pi-gone"):
        fleet.command("pi-gone", "ping", timeout=0.2)


def test_a_closed_client_fails_new_requests_at_once(mosquitto, key_file):
    from toolkit.fleet import FleetClient

    client = FleetClient(mosquitto.url, fleet="abort", key_file=key_file)
    client.connect()
    client.close()
    started = time.monotonic()
    with pytest.raises(FleetError, match="ping to pi-01 not sent: the fleet client was closed"):
        client.command("pi-01", "ping", timeout=30)
    assert time.monotonic() - started < 1
