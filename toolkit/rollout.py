"""Staged rollout: publish an artifact once, deploy it to a canary set, then to the rest in waves.

A new model reaches a fleet the way a careful operator would ship it by hand: a few devices
first, then more once those serve it, and everything undone when too many fail::

    from toolkit.fleet import FleetClient
    from toolkit.rollout import rollout

    with FleetClient("mqtt://127.0.0.1:1883", fleet="lab", key_file="fleet.key") as client:
        result = rollout(client, "runs/art-v2", ["pi-01", "pi-02", "pi-03", "pi-04"], canary=0.25)
        result.ok          # False when the rollout stopped (and rolled back) or reached no one
        result.to_dict()   # {"ok", "artifact", "canary", "waves", "devices", "rolled_back", ...}

What :func:`rollout` does, in order, and where it stops:

1. **Check before sending anything.** The artifact (a directory or a .tar) is verified, every
   file against the SHA-256 in its manifest (:func:`toolkit.fleet.artifact_tar`); the targets
   are checked against the devices' retained states: an id with no state is an error naming the
   known ids, and a target whose frames fail verification with the client's key is an error
   saying the key may be wrong (a device drops, without a word, commands signed with another
   key, so sending them would only wait). Nothing is published or deployed when a check fails.
2. **Publish once** (:meth:`toolkit.fleet.FleetClient.publish_artifact`): retained, signed chunks
   every device of every wave fetches.
3. **Canary, then waves.** The canary set is ``ceil(canary x online targets)`` devices (at
   least one), the first online targets in the order given; the rest follow in waves that
   double: 2c, 4c, 8c... devices for a canary of c. The devices of a wave get their ``deploy``
   at once and the next wave starts when each has answered or ``timeout_s`` has passed. A
   deploy reply that is ok means the device installed the artifact, loaded it, passed its
   health check (finite logits of the right shape on a probe batch) and swapped it in; a device
   whose health check fails keeps serving what it served.
4. **Failures stop it.** An error reply, or no reply within ``timeout_s``, is a failure. When
   the failures exceed ``max_failures``, or when no canary device activated the artifact (then
   nothing has shown that it works), the rollout stops after the current wave: every device
   that activated the artifact during this rollout is sent ``rollback`` (back to the model it
   served before; outcome ``rolled_back``), the devices of later waves are ``skipped``, and
   ``ok`` is False. A device that already served this very artifact before the rollout is not
   rolled back: a rollback would take it to the model before that.

Offline targets are reported with outcome ``offline`` and not deployed to. With ``wait=True``
they form one last wave, before which the rollout waits up to ``timeout_s`` for them to come
online; those still offline then are reported ``offline``. A target that goes offline before its
wave is reported ``offline`` too (not a failure). When no target is online at the start (after
the wait, with ``wait=True``), :class:`RolloutError` says so and nothing is published.

Each device waits for the artifact's chunks ``timeout_s x 0.75`` (the ``deploy`` args'
``timeout_s``), so a download that cannot complete comes back as the device's own error before
the laptop gives up on it. A device busy with another slow command may still answer after
``timeout_s``: it counts as failed all the same, but a late ok is not lost. A rollout that
stops waits up to one more ``timeout_s`` for such replies (unless no device answered at all),
so that a device that activated late is rolled back too; one that completes reports it
``deployed`` if its reply has come by the end.

``on_progress`` receives a :class:`RolloutEvent` for each step (``published``, ``waiting``,
``wave_started``, ``device_done``, ``rolling_back``, ``device_rolled_back``, ``finished``), on
the calling thread, for progress bars. This module imports no torch.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bitfleet.errors import BitfleetError
from edge_agent.protocol import ONLINE, Command
from toolkit.fleet import FleetClient, artifact_tar
from toolkit.fleet_targets import key_trouble, pick_devices, send_all

__all__ = [
    "DEPLOYED",
    "FAILED",
    "OFFLINE",
    "OUTCOMES",
    "ROLLED_BACK",
    "SKIPPED",
    "DeviceOutcome",
    "RolloutError",
    "RolloutEvent",
    "RolloutResult",
    "plan_waves",
    "roll_back",
    "rollout",
]

DEPLOYED = "deployed"
"""Outcome: the device serves the artifact (it answered the deploy ok)."""
FAILED = "failed"
"""Outcome: an error reply, no reply within the timeout, or a rollback that failed."""
OFFLINE = "offline"
"""Outcome: the device was offline when its wave came (and, with ``wait``, stayed offline)."""
ROLLED_BACK = "rolled_back"
"""Outcome: the device activated the artifact, then the stopped rollout rolled it back."""
SKIPPED = "skipped"
"""Outcome: the rollout stopped before the device's wave."""
OUTCOMES: tuple[str, ...] = (DEPLOYED, FAILED, OFFLINE, ROLLED_BACK, SKIPPED)

_DEVICE_WAIT_SHARE = 0.75  # of timeout_s: how long a device waits for the artifact's chunks
_COLLECT_POLL_S = 0.1


class RolloutError(BitfleetError, ValueError):
    """A rollout that cannot start: an unknown target, a key the devices reject, no one online."""


@dataclass(frozen=True)
class RolloutEvent:
    """One step of a rollout, for progress bars (``on_progress``).

    Attributes:
        kind: ``published`` (the artifact's chunks are on the broker), ``waiting`` (for the
            offline ``devices`` to come online, ``wait=True``), ``wave_started`` (``wave``'s
            ``devices`` get their deploy), ``device_done`` (``device`` finished with
            ``outcome`` and ``error``), ``rolling_back`` (the rollout stopped; ``devices`` get a
            rollback), ``device_rolled_back`` (``device`` answered its rollback: ``outcome``
            ``rolled_back`` or ``failed``), ``finished`` (``outcome`` is ``ok`` or ``stopped``).
        wave: the wave's index in :attr:`RolloutResult.waves` (0 is the canary), where one
            applies.
    """

    kind: str
    wave: int | None = None
    devices: tuple[str, ...] = ()
    device: str | None = None
    outcome: str | None = None
    error: str | None = None


@dataclass
class DeviceOutcome:
    """What became of one target: one of :data:`OUTCOMES`, its wave (None: never planned)."""

    id: str
    outcome: str
    wave: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "outcome": self.outcome, "wave": self.wave, "error": self.error}


@dataclass
class RolloutResult:
    """The outcome of :func:`rollout`; :meth:`to_dict` is its JSON form (``--json``).

    ``waves`` lists every planned wave, the canary first (``waves[0] == canary``); a device's
    ``wave`` indexes it. ``error`` says why ``ok`` is False (None when it is True).
    """

    ok: bool
    artifact: dict[str, str]
    canary: list[str]
    waves: list[list[str]]
    devices: list[DeviceOutcome]
    rolled_back: list[str] = field(default_factory=list)
    error: str | None = None

    def outcome(self, device: str) -> str:
        """``device``'s outcome (KeyError for a device that was not a target)."""
        for entry in self.devices:
            if entry.id == device:
                return entry.outcome
        raise KeyError(device)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "artifact": dict(self.artifact),
            "canary": list(self.canary),
            "waves": [list(wave) for wave in self.waves],
            "devices": [entry.to_dict() for entry in self.devices],
            "rolled_back": list(self.rolled_back),
            "error": self.error,
        }


def plan_waves(devices: Sequence[str], canary: float) -> list[list[str]]:
    """Split ``devices`` into the canary wave, ``ceil(canary x n)`` (at least 1), then doubling.

    >>> plan_waves([f"d{i}" for i in range(10)], 0.1)
    [['d0'], ['d1', 'd2'], ['d3', 'd4', 'd5', 'd6'], ['d7', 'd8', 'd9']]
    """
    _check_canary(canary)
    waves: list[list[str]] = []
    size = max(1, math.ceil(canary * len(devices) - 1e-9))  # 0.1 x 10 is 1, not 2
    start = 0
    while start < len(devices):
        waves.append(list(devices[start : start + size]))
        start += size
        size *= 2
    return waves


def rollout(
    client: FleetClient,
    artifact: str | os.PathLike[str],
    targets: Iterable[str],
    *,
    canary: float = 0.1,
    max_failures: int = 0,
    timeout_s: float = 120.0,
    wait: bool = False,
    on_progress: Callable[[RolloutEvent], object] | None = None,
) -> RolloutResult:
    """Deploy ``artifact`` to ``targets`` over the connected ``client``: canary, then waves.

    Args:
        client: a connected :class:`~toolkit.fleet.FleetClient` (its retained states known).
        artifact: the path of an artifact directory or .tar; verified before anything is sent.
        targets: device ids (duplicates count once; the canary is taken in this order).
        canary: the share of the online targets deployed to first, in (0, 1].
        max_failures: how many failed devices the rollout tolerates; one more stops it.
        timeout_s: how long each wave waits for its replies (and, with ``wait``, for offline
            targets to come online).
        wait: wait for offline targets (one last wave) instead of reporting them at once.
        on_progress: called with a :class:`RolloutEvent` at each step, on this thread.

    Raises:
        ValueError: a canary outside (0, 1], a negative ``max_failures``, a ``timeout_s`` that
            is not a positive number, no targets.
        ArtifactError: an artifact that is missing or fails verification.
        RolloutError: an unknown target, frames that fail verification with the client's key,
            no target online.
    """
    _check_canary(canary)
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise ValueError(f"max_failures must be a whole number >= 0, got {max_failures!r}")
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    ids = list(dict.fromkeys(targets))
    if not ids:
        raise ValueError("no target devices: name at least one device id")
    artifact_tar(artifact)  # verifies every file: a damaged artifact raises here, before sending
    states = _check_targets(client, ids)
    run = _Rollout(client, ids, states, canary, max_failures, float(timeout_s), wait, on_progress)
    return run.run(artifact)


# ------------------------------------------------------------------------------ the checks
def _check_canary(canary: float) -> None:
    number = isinstance(canary, int | float) and not isinstance(canary, bool)
    if not (number and math.isfinite(canary) and 0 < canary <= 1):
        raise ValueError(
            f"canary must be a share of the devices in (0, 1], e.g. 0.1 for 10%; got {canary!r}"
        )


def _check_targets(client: FleetClient, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Every target's retained state (offline ones included), before anything is sent.

    Raises :class:`RolloutError` when a target's frames fail verification with the client's key
    (or every device's do and none verifies: the key is wrong), and for an id with no retained
    state, naming the ids that have one.
    """
    states = client.devices()
    refused = client.unverified()
    if any(d in refused and d not in states for d in ids) or (refused and not states):
        raise RolloutError(
            f"no device would accept the deploy command: {key_trouble(client)} (a device drops "
            "commands it cannot verify; nothing was sent)"
        )
    unknown = [d for d in ids if d not in states]
    if unknown:
        known = ", ".join(sorted(states)) or "none (no device has announced itself)"
        raise RolloutError(
            f"unknown device {', '.join(unknown)}: no retained state on this fleet; known "
            f"devices: {known} (nothing was sent)"
        )
    return {d: states[d] for d in ids}


def _online(client: FleetClient, device: str) -> bool:
    return client.devices().get(device, {}).get("status") == ONLINE


# ------------------------------------------------------------------------ concurrent calls
class _Calls:
    """One command sent to several devices at once, each waiting for its reply on a thread.

    The threads are daemons: a reply that never comes does not keep the process alive, and
    one that comes after the wave's deadline is still there for :meth:`late`.
    """

    def __init__(
        self,
        client: FleetClient,
        name: str,
        devices: Sequence[str],
        args: Mapping[str, Any] | None,
        timeout: float,
    ) -> None:
        self.pending = set(devices)
        self._inbox: queue.Queue[tuple[str, dict[str, Any] | None, Exception | None]]
        self._inbox = queue.Queue()
        for device in devices:
            threading.Thread(
                target=self._call,
                args=(client, device, name, args, timeout),
                name=f"bitfleet-{name}-{device}",
                daemon=True,
            ).start()

    def _call(
        self,
        client: FleetClient,
        device: str,
        name: str,
        args: Mapping[str, Any] | None,
        timeout: float,
    ) -> None:
        try:
            self._inbox.put((device, client.command(device, name, args, timeout=timeout), None))
        except Exception as err:  # handed to the caller's thread, which decides what it is
            self._inbox.put((device, None, err))

    def collect(self, deadline: float) -> Iterable[tuple[str, dict[str, Any] | None, str | None]]:
        """``(device, reply, error)`` as each arrives, until all have or ``deadline`` passes."""
        while self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                item = self._inbox.get(timeout=min(left, _COLLECT_POLL_S))
            except queue.Empty:
                continue
            yield self._settle(*item)

    def late(self) -> list[tuple[str, dict[str, Any] | None, str | None]]:
        """What arrived after the deadline, without waiting."""
        found = []
        while self.pending:
            try:
                found.append(self._settle(*self._inbox.get_nowait()))
            except queue.Empty:
                break
        return found

    def _settle(
        self, device: str, reply: dict[str, Any] | None, err: Exception | None
    ) -> tuple[str, dict[str, Any] | None, str | None]:
        self.pending.discard(device)
        if err is None:
            return device, reply, None
        if isinstance(err, BitfleetError | ValueError | OSError):
            return device, None, str(err)
        raise err  # a bug, not a device's answer: keep its traceback


def roll_back(
    client: FleetClient, targets: Sequence[str], *, timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """Send ``rollback`` to every target at once: back to its last-good artifact.

    One row per target, in order: ``{"id", "ok", "name", "version", "error"}``, where ``name``
    and ``version`` are what the device serves again. The targets must be online: an unknown
    or offline one, or a key the devices reject, raises :class:`~toolkit.fleet.FleetError`
    (:func:`toolkit.fleet_targets.pick_devices`) before anything is sent.
    """
    ids = pick_devices(client, list(targets))
    results, errors = send_all(client, ids, Command.ROLLBACK, timeout=timeout_s)
    rows = []
    for device in ids:
        result = results.get(device)
        ok = isinstance(result, dict)
        result = result if isinstance(result, dict) else {}
        rows.append(
            {
                "id": device,
                "ok": ok,
                "name": result.get("name") if ok else None,
                "version": result.get("version") if ok else None,
                "error": None if ok else errors.get(device, "answered without the artifact"),
            }
        )
    return rows


# ------------------------------------------------------------------------------ the engine
@dataclass
class _Device:
    id: str
    before: str | None  # the manifest SHA-256 it served before the rollout (retained state)
    outcome: str = SKIPPED
    wave: int | None = None
    error: str | None = None
    answered: bool = False
    timed_out: bool = False  # no reply within the timeout (a late one may still come)
    activated: bool = False  # swapped this rollout's artifact in (so a stop rolls it back)

    def public(self) -> DeviceOutcome:
        return DeviceOutcome(self.id, self.outcome, self.wave, self.error)


class _Rollout:
    def __init__(
        self,
        client: FleetClient,
        ids: list[str],
        states: dict[str, dict[str, Any]],
        canary: float,
        max_failures: int,
        timeout: float,
        wait: bool,
        on_progress: Callable[[RolloutEvent], object] | None,
    ) -> None:
        self.client = client
        self.ids = ids
        self.canary = canary
        self.max_failures = max_failures
        self.timeout = timeout
        self.wait = wait
        self.on_progress = on_progress
        self.devices = {d: _Device(d, _sha(states[d])) for d in ids}
        self.failures = 0
        self.calls: list[_Calls] = []
        self.stop_reason: str | None = None
        self.args: dict[str, str] = {}

    def emit(self, kind: str, **fields: Any) -> None:
        if self.on_progress is not None:
            self.on_progress(RolloutEvent(kind, **fields))

    def run(self, artifact: str | os.PathLike[str]) -> RolloutResult:
        online = [d for d in self.ids if _online(self.client, d)]
        offline = [d for d in self.ids if d not in online]
        if not online and self.wait:
            self.emit("waiting", devices=tuple(offline))
            self.client.wait_for(
                lambda states: any(states.get(d, {}).get("status") == ONLINE for d in offline),
                timeout=self.timeout,
            )
            online = [d for d in self.ids if _online(self.client, d)]
            offline = [d for d in self.ids if d not in online]
        if not online:
            hint = "" if self.wait else ", or wait for them (--wait)"
            raise RolloutError(
                f"none of the targets is online ({', '.join(offline)} offline): start their "
                f"agents{hint}; nothing was deployed"
            )
        args = self.args = self.client.publish_artifact(artifact)
        self.emit("published")
        waves = plan_waves(online, self.canary)
        if offline and self.wait:
            waves.append(offline)
        else:
            for d in offline:
                self.devices[d].outcome = OFFLINE
                self.emit("device_done", device=d, outcome=OFFLINE)
        for index, wave in enumerate(waves):
            for d in wave:
                self.devices[d].wave = index
        for index, wave in enumerate(waves):
            if self.stop_reason is not None:
                break  # its devices stay skipped
            why = "went offline before its wave"
            if offline and self.wait and index == len(waves) - 1:
                self._wait_online(index, wave)
                why = f"still offline after {self.timeout:g} s of waiting"
            self._deploy_wave(index, wave, why)
            self._judge(index, wave)
        if self.stop_reason is not None:
            # a device that answered nothing yet may be busy, not gone: give it one more
            # timeout to say whether it activated, so that it is rolled back too (unless no
            # device answered at all: then nothing is listening)
            answered = any(e.answered for e in self.devices.values())
            self._late_replies(grace=self.timeout if answered else 0.0)
            self._roll_back()
        else:
            self._late_replies(grace=0.0)
        result = RolloutResult(
            ok=self.stop_reason is None,
            artifact={k: str(args[k]) for k in ("name", "version", "sha256")},
            canary=list(waves[0]),
            waves=waves,
            devices=[self.devices[d].public() for d in self.ids],
            rolled_back=[d for d in self.ids if self.devices[d].outcome == ROLLED_BACK],
            error=self.stop_reason,
        )
        self.emit("finished", outcome="ok" if result.ok else "stopped", error=result.error)
        return result

    def _wait_online(self, index: int, wave: list[str]) -> None:
        self.emit("waiting", wave=index, devices=tuple(wave))
        self.client.wait_for(
            lambda states: all(states.get(d, {}).get("status") == ONLINE for d in wave),
            timeout=self.timeout,
        )

    def _deploy_wave(self, index: int, wave: list[str], offline_why: str) -> None:
        self.emit("wave_started", wave=index, devices=tuple(wave))
        send = []
        for d in wave:
            if _online(self.client, d):
                send.append(d)
            else:
                self._done(d, OFFLINE, offline_why, index)
        if not send:
            return
        args = {**self.args, "timeout_s": round(self.timeout * _DEVICE_WAIT_SHARE, 3)}
        calls = _Calls(self.client, Command.DEPLOY, send, args, self.timeout)
        self.calls.append(calls)
        for device, reply, error in calls.collect(time.monotonic() + self.timeout):
            self._record(device, reply, error)
            entry = self.devices[device]
            self._done(device, entry.outcome, entry.error, index)
        for device in sorted(calls.pending, key=self.ids.index):
            self.failures += 1
            self.devices[device].timed_out = True
            self._done(device, FAILED, self._no_reply(device), index)

    def _record(self, device: str, reply: dict[str, Any] | None, error: str | None) -> None:
        """Note a deploy reply (or the error of sending it) on ``device``'s entry."""
        entry = self.devices[device]
        was_failure = entry.outcome == FAILED
        if reply is None:
            entry.outcome, entry.error = FAILED, error
        else:
            entry.answered = True
            if reply.get("ok"):
                result = reply.get("result")
                entry.outcome, entry.error = DEPLOYED, None
                entry.activated = _sha(result) != entry.before
            else:
                entry.outcome, entry.error = FAILED, str(reply.get("error") or "failed")
        if entry.outcome == FAILED and not was_failure:
            self.failures += 1

    def _done(self, device: str, outcome: str, error: str | None, wave: int) -> None:
        entry = self.devices[device]
        entry.outcome, entry.error = outcome, error
        self.emit("device_done", wave=wave, device=device, outcome=outcome, error=error)

    def _no_reply(self, device: str) -> str:
        refused = self.client.unverified().get(device)
        if refused is not None:
            return (
                f"no reply within {self.timeout:g} s, and its frames fail verification with "
                f"this client's key ({refused}): the key may be wrong"
            )
        return f"no reply within {self.timeout:g} s"

    def _judge(self, index: int, wave: list[str]) -> None:
        """Stop the rollout after wave ``index`` when it must (sets ``stop_reason``)."""
        entries = [self.devices[d] for d in wave]
        tried = [e for e in entries if e.outcome != OFFLINE]
        if index == 0 and tried and all(e.timed_out for e in tried):
            self.stop_reason = (
                f"no device accepted the deploy command: the canary ({_names(tried)}) did not "
                f"answer within {self.timeout:g} s. A device drops, without a word, commands it "
                "cannot verify: check that this client's key is the fleet key the devices run "
                "with, and that they are not busy"
            )
            return
        if self.failures > self.max_failures:
            failed = [e for e in self.devices.values() if e.outcome == FAILED]
            first = failed[0] if failed else None
            why = f"; {first.id}: {first.error}" if first is not None else ""
            devices = "device" if self.failures == 1 else "devices"
            self.stop_reason = (
                f"{self.failures} {devices} failed, more than the {self.max_failures} tolerated "
                f"(--max-failures){why}"
            )
        elif index == 0 and not any(e.outcome == DEPLOYED for e in entries):
            self.stop_reason = (
                "no canary device activated the artifact, so nothing has shown it works"
            )

    def _late_replies(self, grace: float) -> None:
        """Deploy replies that came after their wave's deadline (waiting up to ``grace`` s).

        A late ok still means the device serves the artifact: it is reported ``deployed`` (its
        failure still counts), and rolled back if the rollout stops.
        """
        deadline = time.monotonic() + grace
        for calls in self.calls:
            arrived = list(calls.collect(deadline)) if grace > 0 else calls.late()
            for device, reply, error in arrived:
                if reply is None or not reply.get("ok"):
                    continue
                entry = self.devices[device]
                self._record(device, reply, error)
                entry.error = f"activated the artifact after the {self.timeout:g} s timeout"
                self.emit(
                    "device_done",
                    wave=entry.wave,
                    device=device,
                    outcome=entry.outcome,
                    error=entry.error,
                )

    def _roll_back(self) -> None:
        """Send ``rollback`` to every device that activated the artifact in this rollout."""
        chosen = [d for d in self.ids if self.devices[d].activated]
        if not chosen:
            return
        self.emit("rolling_back", devices=tuple(chosen))
        results, errors = send_all(self.client, chosen, Command.ROLLBACK, timeout=self.timeout)
        name, version = self.args["name"], self.args["version"]
        for device in chosen:
            entry = self.devices[device]
            if device in results:
                entry.outcome = ROLLED_BACK
            else:
                entry.outcome = FAILED
                entry.error = f"serves {name} {version}: its rollback failed: {errors[device]}"
            self.emit("device_rolled_back", device=device, outcome=entry.outcome, error=entry.error)


def _sha(document: Any) -> str | None:
    value = document.get("sha256") if isinstance(document, Mapping) else None
    return value if isinstance(value, str) else None


def _names(entries: Sequence[_Device]) -> str:
    return ", ".join(e.id for e in entries)
