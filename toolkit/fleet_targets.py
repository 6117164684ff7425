"""Which devices a fleet command goes to, and sending one command to many devices at once.

Every many-device command (``bitfleet fleet learn``, ``metrics``, ``logs``, ``infer``,
``rollback``, ``history``, and :mod:`toolkit.rollout`) goes through the same door::

    from edge_agent.protocol import Command
    from toolkit.fleet import FleetClient
    from toolkit.fleet_targets import parse_ids, pick_devices, send_all

    with FleetClient("mqtt://127.0.0.1:1883", fleet="lab", key_file="fleet.key") as client:
        devices = pick_devices(client, parse_ids("pi-01,pi-02"))  # or everyone=True
        results, errors = send_all(client, devices, Command.STATUS)

:func:`parse_ids` reads ``--to``; :func:`pick_devices` turns ``--to``/``--all`` into the online
device ids (an unknown or offline device, an empty fleet or a wrong key is one clear error
before anything is sent, :func:`key_trouble` naming the key); :func:`send_all` sends one
command to many devices concurrently, and a device that fails is data (returned beside the
answers, as Flower returns failed clients), never an exception that loses the others.

Torch-free: it needs only the protocol's names and the laptop's client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from edge_agent.protocol import ONLINE, validate_name
from toolkit.fleet import FleetError

if TYPE_CHECKING:
    from toolkit.fleet import FleetClient

__all__ = ["key_trouble", "parse_ids", "pick_devices", "send_all"]

_MAX_WORKERS = 32  # concurrent requests in flight (each waits on its own reply)


# ------------------------------------------------------------------------------ choosing
def parse_ids(text: str, flag: str = "--to") -> list[str]:
    """``"pi-01,pi-02"`` -> ``["pi-01", "pi-02"]``: valid device ids, no repeats (ValueError)."""
    ids = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in ids):
        raise ValueError(
            f"{flag} takes device ids separated by commas, e.g. pi-01,pi-02; got {text!r}"
        )
    for device in ids:
        validate_name(device, "device id")
    return list(dict.fromkeys(ids))


def key_trouble(client: FleetClient, key: str | None = None) -> str | None:
    """Why devices' frames fail verification with ``client``'s key (None: none do).

    ``key`` names the key in the message (its file, say); without it, "this key".
    """
    refused = client.unverified()
    if not refused:
        return None
    who = ", ".join(f"{d} ({why})" for d, why in sorted(refused.items()))
    return (
        f"frames from {who} fail verification with {key or 'this key'}: the key may be "
        "wrong; use the fleet key the devices run with"
    )


def pick_devices(
    client: FleetClient,
    ids: Sequence[str] | None = None,
    *,
    everyone: bool = False,
    key: str | None = None,
) -> list[str]:
    """The online devices a command goes to: ``ids``, or every online one with ``everyone``.

    Raises :class:`~toolkit.fleet.FleetError` (one line, nothing sent) for a fleet where no
    device has announced itself (naming the key when devices' frames fail verification, as
    they do with a wrong key), an id with no retained state (listing the known ones), a named
    device that is offline, and ``everyone`` on a fleet with no device online. ``key`` names
    the key in those messages (see :func:`key_trouble`).
    """
    if bool(ids) == everyone:
        raise ValueError("name the devices with --to ID[,ID] or pick every online one with --all")
    fleet = client.topics.fleet
    devices = client.devices()
    if not devices:
        trouble = key_trouble(client, key)
        if trouble is not None:
            raise FleetError(f"no device accepted the command: {trouble}")
        raise FleetError(
            f"no device has announced itself on fleet {fleet}; start an agent "
            "(bitfleet-agent run) or check --broker and --fleet"
        )
    known = ", ".join(sorted(devices))
    if everyone:
        online = sorted(d for d, s in devices.items() if s.get("status") == ONLINE)
        if not online:
            raise FleetError(f"no device of fleet {fleet} is online (known, all offline: {known})")
        return online
    assert ids is not None
    for device in ids:
        if device not in devices:
            trouble = key_trouble(client, key)
            why = f"; {trouble}" if trouble else ""
            raise FleetError(f"no device {device} on fleet {fleet} (known: {known}){why}")
        status = devices[device].get("status")
        if status != ONLINE:
            raise FleetError(
                f"{device} is {status}: it cannot take commands until its agent reconnects "
                "(bitfleet fleet ls shows every device's status)"
            )
    return list(ids)


# ------------------------------------------------------------------------------- sending
def send_all(
    client: FleetClient,
    devices: Iterable[str],
    name: str,
    args: Mapping[str, Any] | None = None,
    timeout: float = 10.0,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Send command ``name`` to every device at once; ``(results, errors)`` by device.

    ``results`` holds the ``result`` of each device that answered ``ok``; ``errors`` the
    device's own error, or why no answer came within ``timeout`` seconds. Every request waits
    at most ``timeout``, all at the same time, so the whole call takes about ``timeout`` at
    most, whatever the fleet's size (up to 32 devices at a time).
    """
    targets = list(dict.fromkeys(devices))
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    if not targets:
        return results, errors

    def one(device: str) -> tuple[str, bool, Any]:
        try:
            reply = client.command(device, name, args, timeout=timeout)
        except FleetError as err:
            return device, False, str(err)
        if reply.get("ok"):
            return device, True, reply.get("result")
        return device, False, str(reply.get("error") or f"{name} failed without a message")

    with ThreadPoolExecutor(max_workers=min(_MAX_WORKERS, len(targets))) as pool:
        for device, ok, value in pool.map(one, targets):
            if ok:
                results[device] = value
            else:
                errors[device] = value
    return results, errors
