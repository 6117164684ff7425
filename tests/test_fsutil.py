"""Atomic writes: the content lands whole, and the file gets ordinary permissions."""

from __future__ import annotations

import os
import stat

from bitfleet.fsutil import atomic_write_bytes, atomic_write_json


def test_new_file_gets_umask_permissions_and_replaced_file_keeps_its_own(tmp_path):
    old = os.umask(0o022)
    try:
        fresh = tmp_path / "sub" / "artifact.bin"
        atomic_write_bytes(fresh, b"abc")
        assert fresh.read_bytes() == b"abc"
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's 0600
        fresh.chmod(0o600)  # a secret stays secret when rewritten
        atomic_write_json(fresh, {"b": 1, "a": 2})
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
        assert fresh.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    finally:
        os.umask(old)
    assert not [p for p in fresh.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_secret_is_private_from_the_first_byte_and_a_link_is_refused(tmp_path):
    from bitfleet.fsutil import atomic_write_secret

    target = tmp_path / "fleet.key"
    target.write_bytes(b"old")
    target.chmod(0o644)  # a readable file it replaces does not leave the secret readable
    atomic_write_secret(target, b"k" * 32)
    assert target.read_bytes() == b"k" * 32
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write_secret(tmp_path / "new.key", b"x")
    assert stat.S_IMODE((tmp_path / "new.key").stat().st_mode) == 0o600
    (tmp_path / "link.key").symlink_to(target)
    try:
        atomic_write_secret(tmp_path / "link.key", b"y")
    except OSError:
        pass
    else:
        raise AssertionError("a secret written through a symbolic link")
    assert target.read_bytes() == b"k" * 32
