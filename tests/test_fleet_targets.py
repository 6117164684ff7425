"""toolkit.fleet_targets on its own: reading --to, and importing it without torch.

Picking devices and sending to many are exercised against real agents by every fleet command's
tests (test_fleet_learn_cmd, test_fleet_device_cmd, test_fleet_deploy_cmd, test_rollout).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.fleet_targets import parse_ids

REPO = Path(__file__).resolve().parents[1]


def test_parse_ids_takes_a_comma_list_and_names_a_bad_one():
    assert parse_ids("pi-01, pi-02,pi-01") == ["pi-01", "pi-02"]
    for bad in ("", "pi-01,", "pi/01"):
        with pytest.raises(ValueError, match="--to|device id"):
            parse_ids(bad)


def test_import_does_not_load_torch():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = "import sys, toolkit.fleet_targets; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
