"""The two exact forms of a binary convolution (or dense layer) in TFLite's builtin ops.

TFLite has no XNOR-popcount operator, and a plain int8 convolution of +-1 values is never
exact: its int32 sum ``K - 2 * popcount`` spans +-K (+-1152 for a 3x3 conv over 128 channels),
and the int8 output it requantises to holds 256 values. Both forms below are exact:

``float``
    Signs as float +-1, padded with +1, into a float CONV_2D whose +-1 weights are stored as
    int8 and widened by a DEQUANTIZE (done once, when the interpreter prepares the graph). The
    sums are integers below 2**24, so float32 adds them exactly. Costs what a float layer costs.
``int8``
    Signs as int8 +-1 (scale 1), padded with +1, split along the channels into groups small
    enough that each group's int8 CONV_2D output holds its partial sum exactly: ``K`` taps give
    a sum of ``K``'s parity in [-K, K], so at output scale 2 a group may hold ``K <= 254`` taps
    when ``K`` is even, and at scale 1 ``K <= 127`` taps of any parity. Each partial sum is
    dequantized and ADDs sum them in float (exact). Runs on the int8 kernels (XNNPACK's QS8
    path on ARM and x86), at the cost of one small conv per group.
``int4``
    The ``int8`` form with its +-1 weights stored two to a byte (TFLite's INT4 filters,
    unpacked by the interpreter at prepare). The smallest file, but XNNPACK does not take int4
    convolutions, so they run in TFLite's own int8 kernels: measured slower than float.

:func:`channel_groups` cuts the channels; :func:`choose_form` is the per-layer rule of
``binary_form="auto"``, from the measurements in BENCHMARKS.md.
"""

from __future__ import annotations

__all__ = [
    "BINARY_FORMS",
    "channel_groups",
    "choose_form",
]

BINARY_FORMS = ("auto", "float", "int8", "int4")


def channel_groups(channels: int, taps: int) -> list[tuple[int, float]]:
    """Cut ``channels`` input channels of a ``taps``-tap kernel (kh * kw) into exact groups.

    Returns ``(channels_in_group, output_scale)`` pairs in channel order: scale 2.0 for a group
    whose tap count ``channels_in_group * taps`` is even and at most 254, scale 1.0 for an odd
    one of at most 127 taps (see the module's doc).
    """
    if channels < 1 or taps < 1:
        raise ValueError(f"channels and taps must be >= 1, got {channels} and {taps}")
    if taps > 254:
        raise ValueError(f"a {taps}-tap kernel does not fit one int8 group; use the float form")
    per_group = 254 // taps
    if (per_group * taps) % 2:  # taps odd and per_group odd: one channel less keeps K even
        per_group -= 1
    if per_group == 0:  # an odd tap count above 127: no group of it is exact
        raise ValueError(f"a {taps}-tap kernel does not fit one int8 group; use the float form")
    groups: list[tuple[int, float]] = []
    left = channels
    while left >= per_group:
        groups.append((per_group, 2.0))
        left -= per_group
    if left:
        if (left * taps) % 2 == 0:
            groups.append((left, 2.0))
        elif left * taps <= 127:
            groups.append((left, 1.0))
        else:  # an odd remainder too large for scale 1: an even part and one channel
            groups.append((left - 1, 2.0))  # taps <= 127 here: per_group >= 2 needs it
            groups.append((1, 1.0))
    return groups


def choose_form(wanted: str, channels: int, taps: int) -> str:
    """The form a layer gets: ``wanted``, or for ``auto`` int8 wherever exact groups exist.

    ``int8`` and ``int4`` layers whose kernel has no exact group fall back to ``float``.

    Measured on Bi-Real-18's 3x3 layers in LiteRT (BENCHMARKS.md), the int8 form was faster
    at every width, 3 to 19 groups: 2.0-2.4x at one thread, 1.4-1.7x at two.
    """
    if wanted not in BINARY_FORMS:
        raise ValueError(f"unknown binary form {wanted!r}; use one of {', '.join(BINARY_FORMS)}")
    if wanted == "float":
        return wanted
    try:
        channel_groups(channels, taps)
    except ValueError:
        return "float"
    return "int8" if wanted == "auto" else wanted
