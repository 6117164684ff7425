"""Model merging for gossip learning: plain averaging and variance-corrected averaging.

A node that receives models from its peers merges them into its own with :func:`merge`, a pure
function over ``name -> numpy array`` mappings (a PyTorch ``state_dict`` converted with
``{k: v.numpy() for k, v in sd.items()}``). The gossip simulator and the MQTT agent are two
callers of the same code; :class:`Merger` is the small stateful policy both use to buffer
received models and decide when to merge::

    from edge_agent.merge import Merger

    merger = Merger(method="vc", self_weight=0.5, variance="others", trigger="all",
                    neighbours=["pi-2", "pi-7"])
    merger.add("pi-2", model_from_pi2, weight=600)   # weight: e.g. its training-sample count
    merger.add("pi-7", model_from_pi7, weight=400)
    merged = merger.merge_into(own)                  # None until the trigger is reached

Methods (``method=``):

- ``"avg"``: ``self_weight * own + (1 - self_weight) * mean(received)``, a FedAvg-style mix.
- ``"vc"``: variance-corrected averaging (Tian, Al-Ars, Kitsak, Hofstee, 2024). Averaging ``N``
  uncorrelated models leaves each weight tensor with about ``1/N`` of their variance, far below
  what Xavier/Kaiming initialisation set up, and training stalls ("vanishing variance"). So after
  the same mix every rescaled tensor ``t`` is stretched around its own mean to a target variance::

      t' = (t - mean(t)) * sqrt((target + eps) / (var(t) + eps)) + mean(t),   eps = 1e-4

  with ``var`` the unbiased sample variance (``ddof=1``, as ``torch.var``) over all elements of
  the tensor. The target, per tensor, is chosen by ``variance=``:

  - ``"others"``: the mean variance of the received models (the paper's method);
  - ``"self"``: the node's own variance;
  - ``"conservative"``: ``self_weight * var(own) + (1 - self_weight) * mean var(received)``.

  All variances are taken *before* mixing. The paper's code (DFL_torch) reads the node's own
  variance *after* its in-place mix in its conservative mode; bitfleet uses the variance before
  mixing, as the method describes.

  The rescaling rule (``rule=``) differs between the paper code's two versions:

  - ``"bitfleet"`` (the default; DFL_torch's): the formula above, every rescaled tensor (see
    below), sample variance (``ddof=1``), ``eps = 1e-4``;
  - ``"dfl2"`` (DFL2, the C++ simulator of the paper's first version): weights only, so tensors
    whose name ends in ``bias`` are averaged but not rescaled; population variance
    (``ddof=0``) for the target and the mix alike; no epsilon,
    ``t' = (t - mean(t)) * sqrt(target / var(t)) + mean(t)``; a mix of zero variance is left
    as it is (there is no spread to stretch).

With ``weights=`` (one positive number per received model, e.g. sample counts) "mean" above is
the weighted mean, of the tensors and of their variances alike.

FedAvg's server (McMahan et al. 2017) averages differently: :func:`weighted_average` is the
sample-weighted mean of *every* tensor, batch-norm statistics and counters included, with no
own model to keep values from. It shares :func:`merge`'s arithmetic and dtype rules.

Which tensors take part (:func:`is_rescaled`):

- batch-norm running statistics and counters (names ending in ``running_mean``, ``running_var``
  or ``num_batches_tracked``) keep the node's own values: neither averaged nor rescaled, as in
  the paper's code;
- single-element (and empty) tensors are averaged but never rescaled (a variance needs two
  values);
- integer and boolean tensors are averaged, rounded half to even (``np.rint``) and cast back
  to their dtype, never rescaled;
- every other floating-point tensor with at least two elements is averaged and, with ``"vc"``,
  rescaled.

Arithmetic is done in float64 and cast back to the own model's dtype, so float32 weights lose
nothing to accumulation and the result is bit-for-bit deterministic: each tensor's result
depends only on that tensor's arrays (in the order of ``received``), never on the order of the
names in the mappings. Names are checked in sorted order (so the first error reported does not
depend on dict order either), and the result lists its names in ``own``'s order, so a merged
``state_dict`` reads like the one it came from.

# References
- Tian, Al-Ars, Kitsak, Hofstee. Vanishing variance in gossip learning (2024); code: DFL_torch.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from bitfleet.errors import BitfleetError

__all__ = [
    "EPS",
    "METHODS",
    "VARIANCE_MODES",
    "MergeError",
    "Merger",
    "is_rescaled",
    "keeps_own",
    "merge",
    "tensor_variance",
    "weighted_average",
]

EPS = 1e-4
"""The epsilon of the variance correction (the paper's value)."""

METHODS = ("avg", "vc")
VARIANCE_MODES = ("others", "self", "conservative")
RULES = ("bitfleet", "dfl2")
"""Rescaling rules of ``"vc"``: bitfleet's (DFL_torch's) and DFL2's (see the module doc)."""

_OWN_ONLY_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_ROUNDED_KINDS = "biu"  # bool, signed and unsigned integers
_SUPPORTED_KINDS = _ROUNDED_KINDS + "f"

Model = Mapping[str, NDArray[np.generic]]


class MergeError(BitfleetError, ValueError):
    """Models that cannot be merged: different tensor names, shapes or an unsupported dtype."""


def keeps_own(name: str) -> bool:
    """Whether ``name`` is a batch-norm running statistic or counter, kept from the own model."""
    return name.endswith(_OWN_ONLY_SUFFIXES)


def is_rescaled(name: str, array: NDArray[np.generic]) -> bool:
    """Whether the tensor takes part in variance correction.

    True for floating-point tensors of at least two elements that are not batch-norm running
    statistics or counters; False for everything else (see the module docstring).
    """
    array = np.asarray(array)
    return not keeps_own(name) and array.dtype.kind == "f" and array.size > 1


def tensor_variance(model: Model) -> dict[str, float]:
    """Unbiased variance (``ddof=1``, float64) of every rescaled tensor of ``model``.

    The quantity variance correction acts on; the gossip simulator logs it to show variance
    vanishing under plain averaging. Names come in ``model``'s order.
    """
    return {
        name: _variance(np.asarray(array))
        for name, array in model.items()
        if is_rescaled(name, np.asarray(array))
    }


def merge(
    own: Model,
    received: Sequence[Model],
    method: str = "vc",
    self_weight: float = 0.5,
    variance: str = "others",
    weights: Sequence[float] | None = None,
    no_rescale: Collection[str] = (),
    rule: str = "bitfleet",
) -> dict[str, NDArray[np.generic]]:
    """Merge the ``received`` models into ``own`` and return the new model.

    Args:
        own: the node's model, ``name -> array``. Its names, shapes and dtypes are the result's.
        received: one or more models with exactly the same names and shapes.
        method: ``"avg"`` (plain mix) or ``"vc"`` (mix, then variance correction).
        self_weight: weight ``s`` of the own model in ``s * own + (1 - s) * mean(received)``,
            in ``[0, 1)``. ``1 / (len(received) + 1)`` gives the plain average of all models.
        variance: target variance of ``"vc"``: ``"others"``, ``"self"`` or ``"conservative"``
            (ignored by ``"avg"``, but still checked).
        weights: optional positive weight per received model (e.g. sample counts) for the
            weighted mean of the received tensors and of their variances; equal by default.
        no_rescale: names averaged but never variance-corrected, such as the latent weights of
            binary layers: ``sign(w)`` ignores their scale, so rescaling them only moves them
            away from the sign threshold (see docs/reproductions/vanishing_variance.md).
        rule: ``"vc"``'s rescaling rule, ``"bitfleet"`` (ddof 1, eps 1e-4, every tensor) or
            ``"dfl2"`` (ddof 0, no eps, biases not rescaled); see the module doc.

    Returns:
        A new dict (no array is shared with the inputs), names in ``own``'s order.

    Raises:
        ValueError: no received model, an unknown method, variance mode or rule,
            ``self_weight`` outside ``[0, 1)``, or weights of the wrong length or not positive.
        MergeError: names or shapes differ between ``own`` and a received model, or a tensor
            has an unsupported dtype (complex, object, ...).
    """
    labels = [f"received model {i}" for i in range(len(received))]
    return _merge(own, received, labels, method, self_weight, variance, weights, no_rescale, rule)


def weighted_average(
    models: Sequence[Model], weights: Sequence[float] | None = None
) -> dict[str, NDArray[np.generic]]:
    """The weighted mean of every tensor of ``models``, as FedAvg's server takes it.

    Unlike :func:`merge`, nothing is kept from one model: batch-norm running statistics and
    counters are averaged too. Integer and boolean tensors are rounded half to even and cast
    back, floating-point ones cast back to their dtype, from float64 arithmetic.

    Args:
        models: one or more models with the same names and shapes; the result takes the first
            model's names (in its order) and dtypes.
        weights: one positive weight per model (e.g. its training-sample count); equal by
            default.

    Raises:
        ValueError: no model, or weights of the wrong length or not positive.
        MergeError: names or shapes differ, or a tensor has an unsupported dtype.
    """
    if len(models) == 0:
        raise ValueError("weighted_average needs at least one model")
    w = _normalised_weights(weights, len(models))
    first = {name: np.asarray(a) for name, a in models[0].items()}
    arrays = [first] + [{name: np.asarray(a) for name, a in m.items()} for m in models[1:]]
    _check_compatible(first, arrays[1:], [f"model {i}" for i in range(1, len(arrays))])
    return {
        name: _cast(_weighted_mean([m[name] for m in arrays], w), first[name].dtype)
        for name in first
    }


class Merger:
    """Buffer received models and merge them once a trigger is reached.

    The policy shared by the gossip simulator and the MQTT agent: :meth:`add` keeps the latest
    model from each sender (a newer push replaces the older one, so a fast peer cannot outvote
    the others), :attr:`ready` says whether ``trigger`` models are buffered, and
    :meth:`merge_into` merges them into the own model with :func:`merge` and empties the buffer.
    Buffered models are merged in sorted sender order, so the result does not depend on the
    order in which pushes arrived.

    Args:
        method, self_weight, variance, no_rescale, rule: as in :func:`merge`, checked here.
        trigger: merge when at least this many senders are buffered (an int >= 1), or ``"all"``:
            when every one of ``neighbours`` is.
        neighbours: the senders this node listens to. Required with ``trigger="all"``; when
            given, :meth:`add` refuses any other sender.
    """

    def __init__(
        self,
        method: str = "vc",
        self_weight: float = 0.5,
        variance: str = "others",
        trigger: int | Literal["all"] = 1,
        neighbours: Iterable[str] | None = None,
        no_rescale: Collection[str] = (),
        rule: str = "bitfleet",
    ) -> None:
        _check_options(method, self_weight, variance, rule)
        self.no_rescale = frozenset(no_rescale)
        self.rule = rule
        self.method = method
        self.self_weight = float(self_weight)
        self.variance = variance
        self.neighbours: frozenset[str] | None = (
            None if neighbours is None else frozenset(neighbours)
        )
        if trigger == "all":
            if not self.neighbours:
                raise ValueError('trigger="all" needs a non-empty neighbours list')
            self._needed = len(self.neighbours)
        elif isinstance(trigger, int) and not isinstance(trigger, bool) and trigger >= 1:
            if self.neighbours is not None and trigger > len(self.neighbours):
                raise ValueError(
                    f"trigger={trigger} can never be reached with {len(self.neighbours)} neighbours"
                )
            self._needed = trigger
        else:
            raise ValueError(f'trigger must be an int >= 1 or "all", not {trigger!r}')
        self.trigger = trigger
        self._buffer: dict[str, tuple[Model, float]] = {}

    def add(self, sender: str, model: Model, weight: float = 1.0) -> None:
        """Buffer ``model`` from ``sender``, replacing any earlier model from the same sender.

        The mapping is copied shallowly (the arrays are not): do not modify them in place.
        ``weight`` is the sender's weight in the mean of the received models (e.g. its sample
        count). Raises ValueError for a non-positive weight or a sender outside ``neighbours``.
        """
        if self.neighbours is not None and sender not in self.neighbours:
            raise ValueError(f"{sender!r} is not a neighbour of this node")
        weight = float(weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be positive and finite, not {weight!r}")
        self._buffer[sender] = (dict(model), weight)

    @property
    def pending(self) -> int:
        """How many senders have a model in the buffer."""
        return len(self._buffer)

    @property
    def senders(self) -> tuple[str, ...]:
        """The buffered senders, sorted."""
        return tuple(sorted(self._buffer))

    @property
    def ready(self) -> bool:
        """Whether the buffer holds enough models to merge."""
        return len(self._buffer) >= self._needed

    def discard(self, sender: str) -> bool:
        """Drop ``sender``'s buffered model (e.g. after a MergeError); True if there was one."""
        return self._buffer.pop(sender, None) is not None

    def clear(self) -> None:
        """Empty the buffer."""
        self._buffer.clear()

    def merge_into(self, own: Model) -> dict[str, NDArray[np.generic]] | None:
        """Merge the buffered models into ``own`` if :attr:`ready`, else return None.

        On success the buffer is emptied. A MergeError names the offending sender and leaves
        the buffer as it was, so the caller can :meth:`discard` that sender.
        """
        if not self.ready:
            return None
        senders = self.senders
        models = [self._buffer[s][0] for s in senders]
        weights = [self._buffer[s][1] for s in senders]
        labels = [f"model from {s!r}" for s in senders]
        merged = _merge(
            own,
            models,
            labels,
            self.method,
            self.self_weight,
            self.variance,
            weights,
            self.no_rescale,
            self.rule,
        )
        self.clear()
        return merged

    def __repr__(self) -> str:
        return (
            f"Merger(method={self.method!r}, self_weight={self.self_weight}, "
            f"variance={self.variance!r}, rule={self.rule!r}, trigger={self.trigger!r}, "
            f"pending={self.pending})"
        )


# ---------------------------------------------------------------------------------------------


def _check_options(method: str, self_weight: float, variance: str, rule: str = "bitfleet") -> None:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    if rule not in RULES:
        raise ValueError(f"unknown rescaling rule {rule!r}; valid: {', '.join(RULES)}")
    if variance not in VARIANCE_MODES:
        raise ValueError(f"unknown variance mode {variance!r}; valid: {', '.join(VARIANCE_MODES)}")
    if not (0.0 <= float(self_weight) < 1.0):
        raise ValueError(f"self_weight must be in [0, 1), not {self_weight!r}")


def _normalised_weights(weights: Sequence[float] | None, count: int) -> NDArray[np.float64]:
    if weights is None:
        return np.full(count, 1.0 / count)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (count,):
        raise ValueError(f"got {w.size} weights for {count} received models")
    if not (np.all(np.isfinite(w)) and np.all(w > 0)):
        raise ValueError(f"weights must be positive and finite, got {list(w)}")
    return w / w.sum()


def _variance(array: NDArray[np.generic], ddof: int = 1) -> float:
    # np.var takes numeric arrays only; converting first gives the same float64 sums
    return float(np.var(array.astype(np.float64, copy=False), dtype=np.float64, ddof=ddof))


def _weighted_mean(
    arrays: Sequence[NDArray[np.generic]], w: NDArray[np.float64]
) -> NDArray[np.float64]:
    """``sum(w_i * a_i)`` in float64, summed in the order of ``arrays``."""
    return sum(
        (wi * a.astype(np.float64, copy=False) for wi, a in zip(w, arrays, strict=True)),
        np.zeros(arrays[0].shape),
    )


def _cast(mean: NDArray[np.float64], dtype: np.dtype) -> NDArray[np.generic]:
    """Back to ``dtype``: integer and boolean results rounded half to even first."""
    return (np.rint(mean) if dtype.kind in _ROUNDED_KINDS else mean).astype(dtype)


def _check_compatible(
    own: Mapping[str, NDArray[np.generic]],
    received: Sequence[Mapping[str, NDArray[np.generic]]],
    labels: Sequence[str],
) -> None:
    names = set(own)
    for model, label in zip(received, labels, strict=True):
        missing, extra = sorted(names - set(model)), sorted(set(model) - names)
        if missing or extra:
            raise MergeError(
                f"{label} does not match the own model: missing {missing}, extra {extra}"
            )
    for name in sorted(names):
        if own[name].dtype.kind not in _SUPPORTED_KINDS:
            raise MergeError(f"tensor {name!r} has unsupported dtype {own[name].dtype}")
        for model, label in zip(received, labels, strict=True):
            if model[name].shape != own[name].shape:
                raise MergeError(
                    f"tensor {name!r} has shape {model[name].shape} in {label} "
                    f"but {own[name].shape} in the own model"
                )
            if model[name].dtype.kind not in _SUPPORTED_KINDS:
                raise MergeError(
                    f"tensor {name!r} has unsupported dtype {model[name].dtype} in {label}"
                )


def _merge(
    own_in: Model,
    received_in: Sequence[Model],
    labels: Sequence[str],
    method: str,
    self_weight: float,
    variance: str,
    weights: Sequence[float] | None,
    no_rescale: Collection[str] = (),
    rule: str = "bitfleet",
) -> dict[str, NDArray[np.generic]]:
    _check_options(method, self_weight, variance, rule)
    exempt = frozenset(no_rescale)
    if rule == "dfl2":  # weights only, population variance
        exempt = exempt | {name for name in own_in if name.endswith("bias")}
    ddof = 1 if rule == "bitfleet" else 0
    if len(received_in) == 0:
        raise ValueError("merge needs at least one received model")
    w = _normalised_weights(weights, len(received_in))
    s = float(self_weight)

    own = {name: np.asarray(a) for name, a in own_in.items()}
    received = [{name: np.asarray(a) for name, a in m.items()} for m in received_in]
    _check_compatible(own, received, labels)

    merged: dict[str, NDArray[np.generic]] = {}
    for name in sorted(own):
        mine = own[name]
        if keeps_own(name):
            merged[name] = mine.copy()
            continue
        theirs = [m[name].astype(np.float64) for m in received]
        mixed = s * mine.astype(np.float64) + (1.0 - s) * _weighted_mean(theirs, w)
        if mine.dtype.kind in _ROUNDED_KINDS:
            merged[name] = _cast(mixed, mine.dtype)
            continue
        if method == "vc" and name not in exempt and is_rescaled(name, mine):
            if variance == "self":
                target = _variance(mine, ddof)
            else:
                others_var = float(
                    sum(wi * _variance(t, ddof) for wi, t in zip(w, theirs, strict=True))
                )
                if variance == "others":
                    target = others_var
                else:  # conservative
                    target = s * _variance(mine, ddof) + (1.0 - s) * others_var
            center = mixed.mean()
            if rule == "bitfleet":
                scale = math.sqrt((target + EPS) / (_variance(mixed) + EPS))
            else:  # dfl2: no epsilon; a mix with no spread has nothing to stretch
                spread = _variance(mixed, 0)
                scale = math.sqrt(target / spread) if spread > 0 else 1.0
            mixed = (mixed - center) * scale + center
        merged[name] = _cast(mixed, mine.dtype)
    return {name: merged[name] for name in own}
