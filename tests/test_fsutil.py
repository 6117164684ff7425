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
