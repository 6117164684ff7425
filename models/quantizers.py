"""Quantizers: the functions that turn latent float values into binary ones.

A quantizer maps a tensor to {-1, +1} (or to {-a, +a} with a per-channel scale) in the forward
pass. Since sign has zero gradient almost everywhere, each quantizer also defines a
*pseudo-gradient* for the backward pass; the choice of that gradient is what distinguishes the
binary-network papers from one another.

Binary layers (:mod:`models.layers`) take quantizers by name, as Larq does::

    from models.layers import BinaryConv2d

    conv = BinaryConv2d(64, 64, 3, padding=1,
                        input_quantizer="approx_sign",
                        kernel_quantizer="magnitude_aware_sign")

:func:`get` resolves ``None`` (no quantization, the layer stays float), a registered name, a
config dict (``{"name": "swish_sign", "beta": 5.0}``) or a callable. Every quantizer is a small
``nn.Module`` whose :meth:`get_config` round-trips through :func:`get`.

Sign convention: ``sign(0) = +1``, so every output is exactly +-1 (Larq and Larq Compute Engine
do the same, and the packed-bit format relies on it: bit 0 means +1).

Each quantizer declares what an exporter needs to know about it (``binary``,
``per_channel_scale``, :meth:`Quantizer.factorize`), as Larq's quantizers carry their own
``precision``; writers ask for these and never name quantizer classes. A new quantizer is a
:class:`Quantizer` subclass made known by name with :func:`register`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from bitfleet.errors import BitfleetError

__all__ = [
    "Quantizer",
    "SteSign",
    "ApproxSign",
    "SwishSign",
    "MagnitudeAwareSign",
    "ste_sign",
    "approx_sign",
    "swish_sign",
    "magnitude_aware_sign",
    "sign",
    "get",
    "serialize",
    "register",
    "unregister",
    "list_quantizers",
    "UnknownQuantizerError",
]


class UnknownQuantizerError(BitfleetError, ValueError):
    """A quantizer name or config that no registered quantizer matches."""


def sign(x: torch.Tensor) -> torch.Tensor:
    """Binary sign with +1 at zero: every element becomes exactly -1.0 or +1.0.

    ``sign(sign(x) + 0.5)`` maps {-1, 0, +1} to {-1, +1, +1}. It is exact and, on CPU, about
    9x faster than ``torch.where(x < 0, -1.0, 1.0)``, whose scalar form is not vectorized.
    """
    return torch.sign(x).add_(0.5).sign_()


def _inclusive_bound(value: float) -> float:
    # The smallest float32 above ``value``: ``x < bound`` is then ``x <= value`` for float32 x.
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


class _SteSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, clip_value: float) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        ctx.bound = _inclusive_bound(clip_value)
        return sign(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        (x,) = ctx.saved_tensors
        # hardtanh's backward passes grad where -bound < x < bound: the STE box, in one fused,
        # vectorized kernel (a bool mask and a multiply cost three passes and a slow compare).
        # The bound includes |x| == clip_value: latent weights sit exactly at the clip after
        # ``clip_latent_weights`` and must still receive gradients to move back.
        return torch.ops.aten.hardtanh_backward(grad, x, -ctx.bound, ctx.bound), None


class _ApproxSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        (x,) = ctx.saved_tensors
        return grad * x.abs().mul_(-2.0).add_(2.0).clamp_(min=0.0)


class _SwishSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, beta: float) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        ctx.beta = beta
        return sign(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        (x,) = ctx.saved_tensors
        bx = ctx.beta * x
        # derivative of 2*sigmoid(bx)*(1 + bx*(1 - sigmoid(bx))) - 1
        d = ctx.beta * (2.0 - bx * torch.tanh(bx / 2.0)) / (1.0 + torch.cosh(bx))
        return grad * d, None


def ste_sign(x: torch.Tensor, clip_value: float = 1.0) -> torch.Tensor:
    r"""Sign with the straight-through estimator (Hubara et al., 2016).

    .. math::
        q(x) = \begin{cases} -1 & x < 0 \\ 1 & x \geq 0 \end{cases}
        \qquad
        \frac{\partial q}{\partial x} = \begin{cases} 1 & |x| \leq c \\ 0 & |x| > c \end{cases}

    The gradient is cancelled outside ``[-clip_value, clip_value]`` so that latent values far
    from zero, which no small step will flip, stop receiving updates.

    # References
    - Hubara et al., Binarized Neural Networks, NeurIPS 2016.
    """
    return _SteSignFn.apply(x, float(clip_value))


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    r"""Sign with Bi-Real Net's piecewise-polynomial gradient.

    Forward is sign; backward is the derivative of the polynomial ``2x + x^2`` on ``[-1, 0)`` and
    ``2x - x^2`` on ``[0, 1)``, that is ``2 - 2|x|`` for ``|x| < 1`` and 0 elsewhere: a closer fit
    to sign's true (Dirac) derivative than the STE's box.

    # References
    - Liu et al., Bi-Real Net, ECCV 2018.
    """
    return _ApproxSignFn.apply(x)


def swish_sign(x: torch.Tensor, beta: float = 5.0) -> torch.Tensor:
    r"""Sign with the SignSwish gradient of BNN+.

    Backward is the derivative of ``2 sigmoid(beta x)(1 + beta x (1 - sigmoid(beta x))) - 1``:
    ``beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))``. It is not zero outside
    ``[-1, 1]`` and slightly negative there, which pushes values back toward the threshold.

    # References
    - Darabi et al., BNN+: Improved Binary Network Training, 2018.
    """
    return _SwishSignFn.apply(x, float(beta))


def magnitude_aware_sign(x: torch.Tensor, clip_value: float = 1.0) -> torch.Tensor:
    r"""Sign scaled by the mean magnitude per output channel (Bi-Real's weight quantizer).

    .. math:: q(w) = \operatorname{mean}(|w_c|) \cdot \operatorname{sign}(w)

    where the mean runs over every axis but the first (the output channel in PyTorch's weight
    layout). The scale is treated as a constant in the backward pass, so the gradient is the
    STE's, scaled: ``mean(|w_c|) * 1_{|w| <= clip}``.

    # References
    - Liu et al., Bi-Real Net, ECCV 2018.
    """
    dims = tuple(range(1, x.dim()))
    scale = x.detach().abs().mean(dim=dims, keepdim=True) if dims else x.detach().abs()
    return scale * ste_sign(x, clip_value)


class Quantizer(nn.Module):
    """Base of the registered quantizers: a named, configurable, stateless function.

    Subclasses set ``name`` and ``precision`` (bits of the forward output, 1 for every quantizer
    here) and implement :meth:`forward`. They declare what exporters need to know, so a new
    quantizer exports without any exporter change:

    - ``binary``: the forward output is ``sign(x)`` with ``sign(0) = +1`` (:func:`sign`),
      exactly +-1 per element, times a per-output-channel scale when ``per_channel_scale``.
      Exporters pack such quantizers one bit per value and refuse the others (the default).
    - ``per_channel_scale``: the output is ``scale * sign`` with one scale per output channel
      (the first axis) rather than plain +-1; meaningful for weights only.
    - :meth:`factorize`: the +-1 values and that scale, separately.
    """

    name: str = ""
    precision: int = 1
    binary: bool = False
    per_channel_scale: bool = False

    def get_config(self) -> dict[str, Any]:
        """The arguments that rebuild this quantizer through :func:`get`."""
        return {"name": self.name}

    def factorize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(values, scale)`` with ``forward(x) == scale * values`` (scale per output channel).

        ``scale`` is None when there is none; for a ``binary`` quantizer ``values`` is +-1, and
        ``scale`` has one entry per output channel exactly when ``per_channel_scale``. Exporters
        pack ``values`` and fold ``scale`` into the layer's output multiplier.

        Layers use it to apply a per-channel scale to their (small) output instead of to the
        (large) kernel: ``conv(x, s * b) == s * conv(x, b)``, and the scale is a constant in the
        backward pass either way, so gradients are the same with two fewer passes over the
        weights per step.
        """
        return self(x), None

    def extra_repr(self) -> str:
        args = {k: v for k, v in self.get_config().items() if k != "name"}
        return ", ".join(f"{k}={v}" for k, v in args.items())


class SteSign(Quantizer):
    """Module form of :func:`ste_sign`."""

    name = "ste_sign"
    binary = True

    def __init__(self, clip_value: float = 1.0) -> None:
        super().__init__()
        self.clip_value = float(clip_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ste_sign(x, self.clip_value)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "clip_value": self.clip_value}


class ApproxSign(Quantizer):
    """Module form of :func:`approx_sign`."""

    name = "approx_sign"
    binary = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return approx_sign(x)


class SwishSign(Quantizer):
    """Module form of :func:`swish_sign`."""

    name = "swish_sign"
    binary = True

    def __init__(self, beta: float = 5.0) -> None:
        super().__init__()
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swish_sign(x, self.beta)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "beta": self.beta}


class MagnitudeAwareSign(Quantizer):
    """Module form of :func:`magnitude_aware_sign`; meant for kernels, not activations."""

    name = "magnitude_aware_sign"
    binary = True
    per_channel_scale = True

    def __init__(self, clip_value: float = 1.0) -> None:
        super().__init__()
        self.clip_value = float(clip_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return magnitude_aware_sign(x, self.clip_value)

    def factorize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        dims = tuple(range(1, x.dim()))
        if not dims:
            return self(x), None
        scale = x.detach().abs().mean(dim=dims)
        return ste_sign(x, self.clip_value), scale

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "clip_value": self.clip_value}


_REGISTRY: dict[str, type[Quantizer]] = {}

_Q = TypeVar("_Q", bound=type[Quantizer])


def register(cls: _Q) -> _Q:
    """Make a :class:`Quantizer` subclass known by its ``name``; usable as a class decorator.

    Layers, model specs and :func:`get` then resolve it by name (or config dict) as they do the
    built-in quantizers, and exporters export it from what it declares (``binary``,
    ``per_channel_scale``, :meth:`Quantizer.factorize`).
    """
    if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
        raise TypeError(f"only Quantizer subclasses can be registered, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    known = _REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"quantizer '{cls.name}' is already registered ({known.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget the quantizer registered as ``name`` (for plugins and tests that add one)."""
    if name not in _REGISTRY:
        raise _unknown(name)
    del _REGISTRY[name]


for _builtin in (SteSign, ApproxSign, SwishSign, MagnitudeAwareSign):
    register(_builtin)


def list_quantizers() -> list[str]:
    """Names of every registered quantizer, sorted."""
    return sorted(_REGISTRY)


def _unknown(name: str) -> UnknownQuantizerError:
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UnknownQuantizerError(
        f"unknown quantizer '{name}'.{hint} Valid names: {', '.join(list_quantizers())}, or None"
    )


QuantizerLike = None | str | dict[str, Any] | Quantizer | Callable[[torch.Tensor], torch.Tensor]


def get(identifier: QuantizerLike) -> nn.Module | None:
    """Resolve a quantizer from ``None``, a name, a config dict, a module or a callable.

    ``None`` means no quantization. A plain callable is wrapped so it can sit in a module tree;
    such a quantizer cannot be serialized into a spec.
    """
    if identifier is None or isinstance(identifier, Quantizer):
        return identifier
    if isinstance(identifier, str):
        if identifier not in _REGISTRY:
            raise _unknown(identifier)
        return _REGISTRY[identifier]()
    if isinstance(identifier, dict):
        config = dict(identifier)
        name = config.pop("name", None)
        if not isinstance(name, str):
            raise UnknownQuantizerError(
                f"quantizer config {identifier!r} has no 'name'; give e.g. {{'name': 'ste_sign'}}"
            )
        if name not in _REGISTRY:
            raise _unknown(name)
        try:
            return _REGISTRY[name](**config)
        except TypeError as err:
            raise UnknownQuantizerError(f"bad arguments for quantizer '{name}': {err}") from None
    if isinstance(identifier, nn.Module):
        return identifier
    if callable(identifier):
        return _CallableQuantizer(identifier)
    raise UnknownQuantizerError(
        f"cannot make a quantizer from {type(identifier).__name__}; give None, one of "
        f"{', '.join(list_quantizers())}, a config dict or a callable"
    )


def serialize(quantizer: nn.Module | None) -> str | dict[str, Any] | None:
    """The JSON-able form of a quantizer: None, its name, or its config when non-default."""
    if quantizer is None:
        return None
    if not isinstance(quantizer, Quantizer):
        raise UnknownQuantizerError(
            f"quantizer {quantizer!r} is not a registered quantizer and cannot be serialized"
        )
    config = quantizer.get_config()
    default = type(quantizer)().get_config()
    return quantizer.name if config == default else config


class _CallableQuantizer(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
