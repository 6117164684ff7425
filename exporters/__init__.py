"""bitfleet's artifacts: packed-bit format, ONNX writers, and the torch-free runtime.

``export`` (needs torch, imported on first use) writes an artifact; ``runtime.load`` (no torch)
runs one. Importing this package imports neither.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export"]


def export(*args: Any, **kwargs: Any) -> Any:
    """Export a model or checkpoint as an artifact; see :func:`exporters.writer.export`."""
    from .writer import export as _export

    return _export(*args, **kwargs)
