"""The model registry: every network family registers short factories here, as in timm.

A family is one module that ends in a few registered factory functions::

    @register_model(family="resnet")
    def bireal18(num_classes: int = 10, stem: str = "cifar", **kwargs) -> nn.Module:
        return ResNet("bireal", (4, 4, 4, 4), num_classes=num_classes, stem=stem, **kwargs)

:func:`create` is the one door: it binds the caller's arguments to the factory's signature,
fills in every default, builds the module and records that complete argument set as the
module's *spec*. ``build(spec_of(model))`` therefore rebuilds the same architecture, and a spec
saved next to a checkpoint (JSON or YAML) is all a loader needs to know the network.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bitfleet.errors import BitfleetError

__all__ = [
    "ModelEntry",
    "UnknownModelError",
    "SpecError",
    "register_model",
    "create",
    "build",
    "canonical_spec",
    "spec_of",
    "list_models",
    "is_model",
    "model_entry",
    "load_spec",
    "dump_spec",
    "SPEC_FORMAT",
]

SPEC_FORMAT = "bitfleet-model-spec/1"
_SPEC_ATTR = "bitfleet_spec"


class UnknownModelError(BitfleetError, ValueError):
    """A model name that is not registered."""


class SpecError(BitfleetError, ValueError):
    """A model spec that cannot be built: malformed, wrong format, or bad arguments."""


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its name, family and factory."""

    name: str
    family: str
    factory: Callable[..., nn.Module]
    description: str
    canonical: Callable[[dict[str, Any]], dict[str, Any]] | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    family: str | None = None,
    canonical: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Any:
    """Register a factory under its function name; usable bare or with ``family=``.

    ``canonical`` maps the bound arguments (defaults filled in) to the form the spec records
    and the factory receives, for arguments that name something outside the spec: NASB turns
    a genotype file's path into the genotype itself, so the spec rebuilds the network anywhere.
    """

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = factory.__name__
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        fam = family or factory.__module__.rsplit(".", 1)[-1]
        doc = inspect.getdoc(factory) or ""
        _REGISTRY[name] = ModelEntry(name, fam, factory, doc.split("\n", 1)[0], canonical)
        return factory

    return wrap(fn) if fn is not None else wrap


def list_models(filter: str = "*", family: str | None = None) -> list[str]:  # noqa: A002
    """Registered model names matching a shell-style wildcard (and a family), sorted."""
    return sorted(
        name
        for name, entry in _REGISTRY.items()
        if fnmatch.fnmatch(name, filter) and (family is None or entry.family == family)
    )


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _REGISTRY


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``, or an :class:`UnknownModelError` that lists the options."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownModelError(
            f"unknown model '{name}'.{hint} Run `bitfleet models` to list them "
            f"({', '.join(list_models())})"
        ) from None


def _bind(entry: ModelEntry, kwargs: dict[str, Any]) -> dict[str, Any]:
    signature = inspect.signature(entry.factory)
    try:
        bound = signature.bind(**kwargs)
    except TypeError as err:
        valid = ", ".join(signature.parameters)
        raise SpecError(f"model '{entry.name}': {err}; its arguments are: {valid}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _canonical_args(name: str, kwargs: dict[str, Any]) -> tuple[ModelEntry, dict[str, Any]]:
    entry = model_entry(name)
    args = _bind(entry, kwargs)
    if entry.canonical is not None:
        args = entry.canonical(args)
    return entry, args


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` and record its spec on it.

    >>> m = create("bireal18", stem="imagenet", num_classes=1000)
    """
    entry, args = _canonical_args(name, kwargs)
    model = entry.factory(**args)
    setattr(model, _SPEC_ATTR, {"format": SPEC_FORMAT, "name": name, "args": _jsonable(args)})
    return model


def _jsonable(args: dict[str, Any]) -> dict[str, Any]:
    # Tuples become lists, as they would after a JSON round trip, so specs compare equal.
    out = json.loads(json.dumps(args, default=lambda o: _not_jsonable(o)))
    return out


def _not_jsonable(obj: Any) -> Any:
    raise SpecError(
        f"argument value {obj!r} ({type(obj).__name__}) cannot be stored in a model spec; "
        "use names (e.g. quantizer names) or plain numbers"
    )


def spec_of(model: nn.Module) -> dict[str, Any]:
    """The spec of a model built by :func:`create` or :func:`build`: format, name, all args."""
    spec = getattr(model, _SPEC_ATTR, None)
    if spec is None:
        raise SpecError(
            f"{type(model).__name__} was not built by models.create(), so it has no spec; "
            "build it with models.create(name, ...)"
        )
    return json.loads(json.dumps(spec))


def _checked(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    fmt = spec.get("format", SPEC_FORMAT)
    if fmt != SPEC_FORMAT:
        raise SpecError(f"unknown spec format {fmt!r}; this bitfleet reads {SPEC_FORMAT!r}")
    name = spec.get("name")
    args = spec.get("args", {})
    if not isinstance(name, str) or not isinstance(args, dict):
        raise SpecError("a model spec needs a string 'name' and a dict 'args'")
    return name, args


def canonical_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with every argument filled in, as :func:`spec_of` would record it, unbuilt.

    Raises the errors :func:`build` raises for the same spec, without building the network.
    """
    name, args = _checked(spec)
    _, bound = _canonical_args(name, dict(args))
    return {"format": SPEC_FORMAT, "name": name, "args": _jsonable(bound)}


def build(spec: dict[str, Any] | str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model from a spec dict, a JSON/YAML string, or a path to a .json/.yaml file."""
    spec = load_spec(spec) if not isinstance(spec, dict) else spec
    name, args = _checked(spec)
    return create(name, **args)


def load_spec(source: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a spec from a .json/.yaml/.yml path, or from JSON/YAML text."""
    text: str
    path = Path(source) if not (isinstance(source, str) and "\n" in source) else None
    if path is not None and path.suffix in {".json", ".yaml", ".yml"}:
        if not path.is_file():
            raise SpecError(f"spec file {path} does not exist")
        text = path.read_text()
    else:
        text = str(source)
    try:
        import yaml  # JSON is a subset of YAML 1.2 for our purposes

        spec = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - any parse failure is the same user error
        raise SpecError(f"cannot parse model spec: {err}") from None
    if not isinstance(spec, dict):
        raise SpecError("a model spec must be a mapping with 'name' and 'args'")
    return spec


def dump_spec(spec: dict[str, Any], fmt: str = "json") -> str:
    """Serialize a spec as JSON (default) or YAML."""
    if fmt == "json":
        return json.dumps(spec, indent=2, sort_keys=True) + "\n"
    if fmt in {"yaml", "yml"}:
        import yaml

        return yaml.safe_dump(spec, sort_keys=True)
    raise ValueError(f"unknown spec format {fmt!r}; use 'json' or 'yaml'")
