"""Copying this source tree for an install test, as a user's `pip install <tree>` sees it."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IGNORED = shutil.ignore_patterns(
    *(".git", ".venv", "venv", "runs", "build", "dist", "*.egg-info", "__pycache__"),
    *(".*_cache", "*.so"),  # an in-place build of the native kernels must not come along
)


def copy_source(destination: Path) -> Path:
    """Copy the checkout (no venv, caches, builds or compiled kernels) to ``destination``."""
    shutil.copytree(ROOT, destination, ignore=IGNORED)
    return destination
