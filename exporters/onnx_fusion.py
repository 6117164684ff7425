"""Graph rewrites for the fast flavour: fold batch norm and shortcut adds into binary nodes.

A Bi-Real unit exports as ``BinaryConv2d -> BatchNormalization -> Add(shortcut)``. Run as
three steps, the float output of the binary conv would be written, re-read by batch norm,
written again and re-read by the add. Folded, the kernel's epilogue does it all in one pass::

    y = multiplier' * dot + bias' + residual
    multiplier' = multiplier * gamma / sqrt(var + eps)
    bias'       = (bias - mean) * gamma / sqrt(var + eps) + beta

Folding happens only where it is exact: the batch norm's parameters are initializers and the
binary node's output has no other consumer. The residual is broadcast to the output shape by
the runtime, as ``Add`` would.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from .conventions import BINARY_CONV_OP, CUSTOM_DOMAIN, CUSTOM_OPS

__all__ = ["fuse_binary_epilogues", "topological_sort"]


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    table: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            table[name].append(node)
    return table


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for attr in node.attribute:
        if attr.name == name:
            return float(onnx.helper.get_attribute_value(attr))
    return default


def fuse_binary_epilogues(proto: onnx.ModelProto) -> int:
    """Fold BN and residual adds into the ``bitfleet`` binary nodes; return how many folds."""
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    removed: set[int] = set()
    folds = 0
    for node in list(graph.node):
        if node.domain != CUSTOM_DOMAIN or node.op_type not in CUSTOM_OPS:
            continue
        consumers = _consumers(graph)
        users = consumers[node.output[0]]
        if (
            len(users) == 1
            and users[0].op_type == "BatchNormalization"
            and node.output[0] not in outputs
            and all(name in inits for name in users[0].input[1:5])
            and len(users[0].output) == 1
        ):
            bn = users[0]
            gamma, beta, mean, var = (numpy_helper.to_array(inits[n]) for n in bn.input[1:5])
            a = gamma / np.sqrt(var + _attr(bn, "epsilon", 1e-5))
            multiplier = numpy_helper.to_array(inits[node.input[2]]) * a
            bias = (numpy_helper.to_array(inits[node.input[3]]) - mean) * a + beta
            for index, value, suffix in ((2, multiplier, "multiplier"), (3, bias, "bias")):
                name = f"{node.output[0]}_{suffix}_folded"
                tensor = numpy_helper.from_array(value.astype(np.float32), name)
                graph.initializer.append(tensor)
                inits[name] = tensor
                node.input[index] = name
            node.output[0] = bn.output[0]
            graph.node.remove(bn)
            removed.add(id(bn))
            folds += 1
            consumers = _consumers(graph)
            users = consumers[node.output[0]]
        if (
            node.op_type == BINARY_CONV_OP
            and len(node.input) == 4
            and len(users) == 1
            and users[0].op_type == "Add"
            and node.output[0] not in outputs
        ):
            add = users[0]
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            if other != node.output[0]:
                node.input.append(other)
                node.output[0] = add.output[0]
                graph.node.remove(add)
                folds += 1
    topological_sort(graph)
    return folds


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so every input is produced before use.

    Stable: keeps the original order where it already works. Folding a shortcut into a node
    can make it read a tensor that the exporter computed after it.
    """
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progress = False
        for node in list(pending):
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
                pending.remove(node)
                progress = True
                break
        if not progress:
            missing = sorted({n for node in pending for n in node.input} - available)
            raise ValueError(f"graph has a cycle or undefined inputs: {missing[:3]}")
    del graph.node[:]
    graph.node.extend(ordered)
