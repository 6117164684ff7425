"""One error hierarchy for every expected failure.

Anything a user can cause and fix (a bad flag, a damaged checkpoint, an unreachable broker, a
missing optional dependency) raises a subclass of :class:`BitfleetError` with a message of one
line that names what was wrong and what to do. The ``bitfleet`` CLI and the agent daemon catch
this base class at their boundary and print that line; anything else is a bug and keeps its
traceback. Subclasses that also derive from a built-in (``ValueError``, ``RuntimeError``,
``ImportError``) keep working with code that catches the built-in.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType

__all__ = ["BitfleetError", "MissingExtraError", "EXTRAS", "missing_extra", "require"]


class BitfleetError(Exception):
    """Base class of the failures bitfleet reports as one line rather than a traceback."""


class MissingExtraError(BitfleetError, ImportError):
    """A feature needs an optional dependency that this install left out."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra that provides it.

    A Raspberry Pi that only serves installs the base package; training, on-device learning
    and the laptop's tools come with extras (``pip install 'bitfleet[learn]'``), so a missing
    import is an install choice, not a bug, and the message says how to change it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name is not None and module.split(".")[0] != err.name.split(".")[0]:
            raise  # the module exists but something it imports is broken: a real bug
        raise MissingExtraError(
            f"{feature} needs {module.split('.')[0]}, which this install lacks; "
            f"install it with: pip install 'bitfleet[{extra}]'"
        ) from None


#: The extra that brings each optional top-level module (the laptop's view: torch comes with
#: ``train``; a device that learns installs the smaller ``learn``).
EXTRAS: Mapping[str, str] = {
    "onnx": "train",
    "torch": "train",
    "yaml": "train",
    "sklearn": "train",
    "matplotlib": "train",
    "PIL": "train",
    "amqtt": "train",
    "networkx": "train",
}


def missing_extra(err: ImportError, extras: Mapping[str, str] = EXTRAS) -> MissingExtraError | None:
    """The one-line error for an import that failed because an extra is not installed.

    None when ``err`` is about a module no extra provides (then it is a bug, not a choice).
    """
    if isinstance(err, MissingExtraError):
        return err
    top = (err.name or "").split(".")[0]
    extra = extras.get(top)
    if extra is None:
        return None
    return MissingExtraError(
        f"this needs {top}, which this install lacks; install it with: "
        f"pip install 'bitfleet[{extra}]'"
    )
