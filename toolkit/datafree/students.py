"""The compressed students a float teacher becomes: binary Bi-Real-18, or int8 / int4.

- ``int8`` / ``int4``: the teacher's own architecture with every float conv and linear layer
  fake-quantised (:mod:`models.quantized`: per-channel symmetric weights, per-tensor
  asymmetric activations), starting from the teacher's weights, as GDFQ and ZeroQ fine-tune.
  Its batch norms keep the teacher's running statistics, which the student's own
  batch-norm statistics term holds it to while it is distilled.
- ``bireal18``: a Bi-Real ResNet-18 from the registry with the teacher's classes, input
  channels, stem and width. A float ResNet-18 teacher (``resnet18``, Bi-Real's layout) hands over
  every tensor whose shape fits: the stem, the classifier, each basic block's two convs and
  batch norms to the block's two Bi-Real units and its shortcut to the first unit, as Bi-Real
  trains from a real-valued network. Other teachers hand over the tensors whose names and
  shapes match (at least the classifier when the head is alike).
"""

from __future__ import annotations

import re

from torch import nn

import models

__all__ = ["STUDENTS", "make_student", "uses_student_bn_loss"]

#: ``--to`` choices.
STUDENTS = ("bireal18", "int8", "int4")

_BITS = {"int8": 8, "int4": 4}

# a float ResNet basic block's tensors -> the Bi-Real unit that takes them
_BLOCK_TENSOR = re.compile(r"^stages\.(\d+)\.(\d+)\.(conv1|bn1|conv2|bn2|shortcut)\.(.+)$")


def _unit_name(name: str) -> str:
    """``stages.s.b.conv1.w`` -> ``stages.s.(2b).conv.w`` (the Bi-Real unit of the same conv)."""
    match = _BLOCK_TENSOR.match(name)
    if match is None:
        return name
    stage, block, part, rest = match.groups()
    first = 2 * int(block)
    unit, target = {
        "conv1": (first, "conv"),
        "bn1": (first, "bn"),
        "conv2": (first + 1, "conv"),
        "bn2": (first + 1, "bn"),
        "shortcut": (first, "shortcut"),
    }[part]
    return f"stages.{stage}.{unit}.{target}.{rest}"


def _hand_over(teacher: nn.Module, student: nn.Module) -> int:
    """Copy the teacher's tensors into the student where names (mapped) and shapes fit."""
    target = student.state_dict()
    taken = 0
    for name, tensor in teacher.state_dict().items():
        mapped = _unit_name(name)
        if mapped in target and target[mapped].shape == tensor.shape:
            target[mapped].copy_(tensor)
            taken += 1
    student.load_state_dict(target)
    return taken


def make_student(to: str, teacher: nn.Module) -> nn.Module:
    """The ``to`` student of ``teacher`` (built by ``models.create``), initialised from it.

    Raises:
        ValueError: ``to`` is not one of :data:`STUDENTS`.
    """
    if to not in STUDENTS:
        raise ValueError(f"unknown student --to {to!r}; use one of {', '.join(STUDENTS)}")
    spec = models.spec_of(teacher)
    if to in _BITS:
        bits = _BITS[to]
        student = models.create("quantized", base=spec, weight_bits=bits, activation_bits=bits)
        result = student.load_state_dict(teacher.state_dict(), strict=False)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if ".activation_" not in k]
        if unexpected or missing:
            raise RuntimeError(
                f"the {to} student does not mirror its teacher ({(unexpected + missing)[0]})"
            )
        return student
    args = spec.get("args", {})
    num_classes = int(args["num_classes"]) if "num_classes" in args else _classes_of(teacher)
    student = models.create(
        "bireal18",
        num_classes=num_classes,
        in_channels=int(args.get("in_channels", 3)),
        stem=str(args.get("stem", "cifar")),
        width=float(args.get("width", 1.0)),
    )
    _hand_over(teacher, student)
    return student


def _classes_of(teacher: nn.Module) -> int:
    last = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("cannot tell the teacher's number of classes: it has no linear layer")
    return int(last[-1].out_features)


def uses_student_bn_loss(to: str) -> bool:
    """Whether the student's own BN-statistics term applies: its statistics are the teacher's.

    An int student starts as the teacher with its running statistics; a binary student's
    batch norms sit after binary convs and describe different signals, so it has none to keep.
    """
    return to in _BITS
