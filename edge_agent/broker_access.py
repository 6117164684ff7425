"""Mosquitto's password and ACL files, enforced by the embedded amqtt broker.

A fleet's access rules are written once, in Mosquitto's formats (``ops/mosquitto``: a password
file made by ``mosquitto_passwd`` and ``bitfleet.acl``), and the embedded broker reads the same
files, so a trial on a laptop and a real Mosquitto refuse the same things:

- passwords: ``user:$7$<iterations>$<salt>$<hash>`` lines (PBKDF2-HMAC-SHA512, base64), what
  Mosquitto 2's ``mosquitto_passwd`` writes; other hash kinds are refused when the file is read;
- ACL: ``user NAME`` starts a block of ``topic [read|write|readwrite] FILTER`` lines for that
  user; ``pattern [read|write|readwrite] FILTER`` lines apply to every user, with ``%u`` (user
  name) and ``%c`` (client id) substituted; access is denied unless a line grants it. As in
  Mosquitto, a subscription is accepted and every message is checked on delivery ("read"), and
  a publish is checked against "write".

The two amqtt plugins at the end are named in the broker's config by their class path.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bitfleet.errors import BitfleetError

__all__ = [
    "AccessError",
    "AccessList",
    "read_acl_file",
    "read_password_file",
    "check_password",
    "hash_password",
    "MosquittoPasswordPlugin",
    "MosquittoAclPlugin",
]

_ACCESS = ("read", "write", "readwrite")


class AccessError(BitfleetError, ValueError):
    """A password or ACL file the broker cannot use."""


def read_password_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """User name -> Mosquitto ``$7$`` hash, read from a ``mosquitto_passwd`` file."""
    users: dict[str, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise AccessError(f"cannot read password file {path}: {err.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, digest = line.strip().partition(":")
        if not sep or not user or not digest.startswith("$7$") or digest.count("$") != 4:
            raise AccessError(
                f"{path}, line {number}: not a 'user:$7$...' entry; write the file with "
                "mosquitto_passwd (Mosquitto 2)"
            )
        users[user] = digest
    return users


_HASH_ITERATIONS = 101  # what mosquitto_passwd 2.0 uses
_SALT_BYTES = 12


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``password`` hashed as Mosquitto 2's ``mosquitto_passwd`` does: ``$7$101$salt$hash``.

    PBKDF2-HMAC-SHA512, 101 iterations, a random 12-byte salt, both base64: what Mosquitto 2
    and :func:`check_password` verify. Made in Python, so writing a password file needs no
    Mosquitto and never puts a password on a command line.
    """
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, _HASH_ITERATIONS)
    encoded = (base64.b64encode(part).decode("ascii") for part in (salt, digest))
    return f"$7${_HASH_ITERATIONS}${'$'.join(encoded)}"


def check_password(digest: str, password: str) -> bool:
    """Whether ``password`` matches a Mosquitto ``$7$`` hash (constant-time comparison)."""
    try:
        _, kind, iterations, salt, expected = digest.split("$")
        if kind != "7":
            return False
        calculated = hashlib.pbkdf2_hmac(
            "sha512", password.encode("utf-8"), base64.b64decode(salt), int(iterations)
        )
        return hmac.compare_digest(calculated, base64.b64decode(expected))
    except (ValueError, TypeError):
        return False


@dataclass(frozen=True)
class _Rule:
    access: str
    filter: str


@dataclass
class AccessList:
    """Rules of a Mosquitto ACL file: per-user ``topic`` lines and ``pattern`` lines for all."""

    users: dict[str, list[_Rule]] = field(default_factory=dict)
    patterns: list[_Rule] = field(default_factory=list)

    def allows(self, user: str | None, client_id: str, topic: str, *, write: bool) -> bool:
        """Whether ``user`` (connected as ``client_id``) may write / read ``topic``."""
        wanted = "write" if write else "read"
        rules = list(self.users.get(user or "", [])) if user else []
        for rule in self.patterns:
            if user is None:
                continue  # patterns apply to authenticated users only
            name = rule.filter.replace("%u", user).replace("%c", client_id)
            rules.append(_Rule(rule.access, name))
        return any(
            wanted in rule.access and mqtt.topic_matches_sub(rule.filter, topic) for rule in rules
        )


def read_acl_file(path: str | os.PathLike[str]) -> AccessList:
    """Parse a Mosquitto ACL file (``user``, ``topic`` and ``pattern`` lines)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise AccessError(f"cannot read ACL file {path}: {err.strerror}") from None
    acl = AccessList()
    user: str | None = None
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split(None, 2)
        keyword = words[0]
        if keyword == "user" and len(words) >= 2:
            user = line.split(None, 1)[1]
            acl.users.setdefault(user, [])
            continue
        if keyword in ("topic", "pattern") and len(words) >= 2:
            if len(words) == 3 and words[1] in _ACCESS:
                access, topic = words[1], words[2]
            else:
                access, topic = "readwrite", line.split(None, 1)[1]
            rule = _Rule(access, topic.strip())
            if keyword == "pattern":
                acl.patterns.append(rule)
            elif user is not None:
                acl.users[user].append(rule)
            continue  # topic lines before any user line are for anonymous clients: none here
        raise AccessError(
            f"{path}, line {number}: expected 'user NAME', 'topic [read|write|readwrite] T' "
            f"or 'pattern [read|write|readwrite] T', got {line!r}"
        )
    return acl


# -- amqtt plugins (loaded by class path in the broker process) ---------------------------------
from amqtt.contexts import Action  # noqa: E402 - amqtt is imported only by the broker process
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin  # noqa: E402


class MosquittoPasswordPlugin(BaseAuthPlugin):
    """Authenticate clients against a Mosquitto password file (no anonymous access)."""

    @dataclass
    class Config:
        """Where the password file is (a path)."""

        password_file: str = ""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._users = read_password_file(self.config.password_file)

    async def authenticate(self, *, session: Any) -> bool | None:
        digest = self._users.get(session.username or "")
        return digest is not None and check_password(digest, session.password or "")


class MosquittoAclPlugin(BaseTopicPlugin):
    """Check publishes ("write") and deliveries ("read") against a Mosquitto ACL file."""

    @dataclass
    class Config:
        """Where the ACL file is (a path)."""

        acl_file: str = ""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._acl = read_acl_file(self.config.acl_file)

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if action == Action.SUBSCRIBE:
            return True  # as Mosquitto: accepted, then filtered message by message on delivery
        if session is None or not topic:
            return False
        return self._acl.allows(
            session.username, session.client_id, topic, write=action == Action.PUBLISH
        )
