"""What every bitfleet package shares, torch-free: version, errors, crash-safe files, checkpoints.

bitfleet is four packages with strict import rules (``models`` knows nothing of ours, the device
path never loads torch, see ``docs/design.md``). The few things all of them need live here, in
modules that import only the standard library, numpy and safetensors, so any package may import
them without pulling in another layer:

- :mod:`bitfleet.errors`: :class:`~bitfleet.errors.BitfleetError`, the base of every failure a
  user can cause and fix; the ``bitfleet`` CLI and the agent daemon turn it into one line.
- :mod:`bitfleet.fsutil`: atomic writes (temp file, fsync, rename) and file checksums.
- :mod:`bitfleet.checkpoint`: the checkpoint directory format (safetensors + a checksummed
  ``spec.json``); :mod:`models.checkpoint` puts a torch model in and out of it.
- :func:`version`: the installed distribution's version, the one answer every part reports.
"""

from __future__ import annotations

__all__ = ["version", "__version__"]


def version() -> str:
    """The installed ``bitfleet`` distribution's version (``0+unknown`` from a bare source tree)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("bitfleet")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = version()
