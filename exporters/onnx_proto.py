"""Read an ONNX model and cut it into sub-models, without the ``onnx`` package.

The fast runtime needs little of ONNX: the graph's nodes (type, inputs, outputs, attributes),
its initializers as numpy arrays, and, for every run of standard ops, a small model that
ONNX Runtime can load. The ``onnx`` package would give all that, but on a device it costs
about 16 MB of resident memory (7 MB to import, 8 MB more the first time shape inference runs),
a fifth of a Raspberry Pi agent's budget. ONNX files are protocol buffers, and the subset read
here is small and stable (``onnx/onnx.proto``: ModelProto, GraphProto, NodeProto,
AttributeProto, TensorProto, ValueInfoProto), so this module decodes the wire format itself.

Sub-models are spliced, not re-encoded: each node and initializer keeps the exact bytes it had
in the file, and only the small envelope (graph inputs and outputs, opset imports) is written
here. Graph outputs carry only their names; ONNX Runtime infers their types, which
:class:`onnxruntime.InferenceSession` then reports for the next segment's inputs.

Nothing here unpickles or executes anything: a malformed file raises :class:`ProtoError`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ProtoError",
    "Node",
    "Initializer",
    "Model",
    "read_model",
    "segment_model",
    "ELEM_FLOAT",
]

ELEM_FLOAT = 1
"""``TensorProto.FLOAT``: the element type of the runtime's float tensors."""

# TensorProto.DataType -> numpy dtype (little-endian, as raw_data is stored)
_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype("<f4"),
    2: np.dtype("u1"),
    3: np.dtype("i1"),
    4: np.dtype("<u2"),
    5: np.dtype("<i2"),
    6: np.dtype("<i4"),
    7: np.dtype("<i8"),
    9: np.dtype("?"),
    10: np.dtype("<f2"),
    11: np.dtype("<f8"),
    12: np.dtype("<u4"),
    13: np.dtype("<u8"),
}

# AttributeProto.AttributeType values this reader decodes
_FLOAT, _INT, _STRING, _FLOATS, _INTS, _STRINGS = 1, 2, 3, 6, 7, 8

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


class ProtoError(ValueError):
    """The bytes are not an ONNX model this reader understands."""


# --------------------------------------------------------------------------- wire format


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtoError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtoError("varint longer than 10 bytes")


def _signed(value: int) -> int:
    """A varint read as int64 (negative numbers are 10-byte two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of every field; value is an int or a bytes slice."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == _VARINT:
            value, pos = _varint(data, pos)
        elif wire == _BYTES:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise ProtoError(f"field {number} runs past the end of its message")
            value, pos = data[pos : pos + length], pos + length
        elif wire == _FIXED32:
            if pos + 4 > end:
                raise ProtoError("truncated 32-bit field")
            value, pos = data[pos : pos + 4], pos + 4
        elif wire == _FIXED64:
            if pos + 8 > end:
                raise ProtoError("truncated 64-bit field")
            value, pos = data[pos : pos + 8], pos + 8
        else:
            raise ProtoError(f"unsupported wire type {wire} (field {number})")
        yield number, wire, value


def _packed_varints(value: Any, wire: int) -> list[int]:
    """A repeated int64 field: one value, or a packed run of them."""
    if wire == _VARINT:
        return [_signed(value)]
    values, pos = [], 0
    while pos < len(value):
        item, pos = _varint(value, pos)
        values.append(_signed(item))
    return values


def _packed_floats(value: Any, wire: int) -> list[float]:
    if wire == _FIXED32:
        return [struct.unpack("<f", value)[0]]
    if len(value) % 4:
        raise ProtoError("packed floats of a length not divisible by 4")
    return list(struct.unpack(f"<{len(value) // 4}f", value))


def _text(value: Any) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtoError("a name is not valid UTF-8") from None


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _key(number, _BYTES) + _encode_varint(len(payload)) + payload


# ------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Node:
    """A NodeProto: what the runtime needs, and its bytes for splicing into sub-models."""

    op_type: str
    domain: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, Any] = field(repr=False)
    raw: bytes = field(repr=False)


@dataclass(frozen=True)
class Initializer:
    """A TensorProto initializer: its name and bytes, decoded to numpy on demand."""

    name: str
    raw: bytes = field(repr=False)

    def array(self) -> np.ndarray:
        """The tensor as a numpy array (a copy; raw_data or the typed repeated fields)."""
        return _tensor(self.raw)


@dataclass(frozen=True)
class Model:
    """A ModelProto's graph, as the fast runtime reads it."""

    ir_version: int
    opsets: tuple[tuple[str, int], ...]
    nodes: tuple[Node, ...]
    initializers: dict[str, Initializer]
    inputs: tuple[str, ...]  # graph inputs that are not initializers
    outputs: tuple[str, ...]
    _opset_raw: tuple[tuple[str, bytes], ...] = field(repr=False)


def _attribute(data: bytes) -> tuple[str, Any]:
    name, kind = "", 0
    scalar: dict[int, Any] = {}
    ints: list[int] = []
    floats: list[float] = []
    strings: list[str] = []
    for number, wire, value in _fields(data):
        if number == 1:
            name = _text(value)
        elif number == 20:
            kind = value
        elif number == 2:
            scalar[_FLOAT] = struct.unpack("<f", value)[0]
        elif number == 3:
            scalar[_INT] = _signed(value)
        elif number == 4:
            scalar[_STRING] = _text(value)
        elif number == 8:
            ints.extend(_packed_varints(value, wire))
        elif number == 7:
            floats.extend(_packed_floats(value, wire))
        elif number == 9:
            strings.append(_text(value))
    lists = {_INTS: ints, _FLOATS: floats, _STRINGS: strings}
    if kind in lists:
        return name, lists[kind]
    if kind in scalar:
        return name, scalar[kind]
    # tensors, graphs and the like: none of the runtime's nodes reads them
    return name, None


def _node(data: bytes) -> Node:
    inputs: list[str] = []
    outputs: list[str] = []
    name = op_type = domain = ""
    attributes: dict[str, Any] = {}
    for number, _, value in _fields(data):
        if number == 1:
            inputs.append(_text(value))
        elif number == 2:
            outputs.append(_text(value))
        elif number == 3:
            name = _text(value)
        elif number == 4:
            op_type = _text(value)
        elif number == 7:
            domain = _text(value)
        elif number == 5:
            key, attr = _attribute(value)
            attributes[key] = attr
    return Node(op_type, domain, name, tuple(inputs), tuple(outputs), attributes, bytes(data))


def _tensor(data: bytes) -> np.ndarray:
    dims: list[int] = []
    elem = 0
    raw: bytes | None = None
    floats: list[float] = []
    varints: list[int] = []
    doubles: bytes = b""
    name = ""
    for number, wire, value in _fields(data):
        if number == 1:
            dims.extend(_packed_varints(value, wire))
        elif number == 2:
            elem = value
        elif number == 8:
            name = _text(value)
        elif number == 9:
            raw = bytes(value)
        elif number == 4:
            floats.extend(_packed_floats(value, wire))
        elif number in (5, 7, 11):
            varints.extend(_packed_varints(value, wire))
        elif number == 10:
            doubles += bytes(value)
        elif number == 14 and value == 1:
            raise ProtoError(f"initializer {name!r} keeps its data in an external file")
    dtype = _DTYPES.get(elem)
    if dtype is None:
        raise ProtoError(f"initializer {name!r} has unsupported element type {elem}")
    count = int(np.prod(dims)) if dims else 1
    if raw is not None:
        array = np.frombuffer(raw, dtype=dtype)
    elif elem == 1:
        array = np.asarray(floats, dtype=dtype)
    elif elem == 11:
        array = np.frombuffer(doubles, dtype=dtype)
    elif elem == 10:  # float16 travels as its bit patterns in int32_data
        array = np.asarray(varints, dtype=np.uint16).view(dtype)
    else:
        array = np.asarray(varints).astype(dtype)
    if array.size != count:
        raise ProtoError(f"initializer {name!r} holds {array.size} values for dims {dims}")
    return array.reshape(dims).copy()


def _value_info_name(data: bytes) -> str:
    for number, _, value in _fields(data):
        if number == 1:
            return _text(value)
    raise ProtoError("a graph input or output has no name")


def read_model(data: bytes) -> Model:
    """Decode the parts of a serialized ModelProto that the fast runtime uses."""
    ir_version = 0
    opsets: list[tuple[str, int]] = []
    opset_raw: list[tuple[str, bytes]] = []
    graph: bytes | None = None
    for number, _, value in _fields(data):
        if number == 1:
            ir_version = value
        elif number == 8:
            domain, version = "", 0
            for n, _, v in _fields(value):
                if n == 1:
                    domain = _text(v)
                elif n == 2:
                    version = v
            opsets.append((domain, version))
            opset_raw.append((domain, bytes(value)))
        elif number == 7:
            graph = bytes(value)
    if graph is None:
        raise ProtoError("the model has no graph")
    nodes: list[Node] = []
    initializers: dict[str, Initializer] = {}
    inputs: list[str] = []
    outputs: list[str] = []
    for number, _, value in _fields(graph):
        if number == 1:
            nodes.append(_node(value))
        elif number == 5:
            raw = bytes(value)
            names = [_text(v) for n, _, v in _fields(raw) if n == 8]
            if not names:
                raise ProtoError("an initializer has no name")
            initializers[names[0]] = Initializer(names[0], raw)
        elif number == 11:
            inputs.append(_value_info_name(value))
        elif number == 12:
            outputs.append(_value_info_name(value))
    if not nodes or not outputs:
        raise ProtoError("the graph has no nodes or no outputs")
    return Model(
        ir_version,
        tuple(opsets),
        tuple(nodes),
        initializers,
        tuple(name for name in inputs if name not in initializers),
        tuple(outputs),
        tuple(opset_raw),
    )


def _value_info(name: str, elem_type: int | None) -> bytes:
    """A ValueInfoProto: the name, and a tensor type of unknown shape when elem_type is given."""
    payload = _length_delimited(1, name.encode())
    if elem_type is not None:
        tensor_type = _key(1, _VARINT) + _encode_varint(elem_type)
        payload += _length_delimited(2, _length_delimited(1, tensor_type))
    return payload


_ELEM_OF = {dtype: elem for elem, dtype in _DTYPES.items()}


def tensor_bytes(name: str, array: np.ndarray) -> bytes:
    """A TensorProto (dims, element type, raw little-endian data) holding ``array``."""
    array = np.ascontiguousarray(array)
    elem = _ELEM_OF.get(
        array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    )
    if elem is None:
        raise ProtoError(f"cannot store a {array.dtype} tensor")
    out = b"".join(_key(1, _VARINT) + _encode_varint(d & ((1 << 64) - 1)) for d in array.shape)
    out += _key(2, _VARINT) + _encode_varint(elem)
    out += _length_delimited(8, name.encode())
    return out + _length_delimited(9, array.astype(array.dtype.newbyteorder("<")).tobytes())


def segment_model(
    model: Model,
    nodes: list[Node],
    inputs: list[tuple[str, int]],
    outputs: list[str],
    name: str,
    extra_initializers: dict[str, np.ndarray] | None = None,
) -> bytes:
    """Serialize a model of ``nodes`` (standard ops) reading ``inputs`` (name, element type).

    The initializers the nodes read come along, plus ``extra_initializers`` (arrays computed
    at load); ``outputs`` get names only (ONNX Runtime infers their types). Opset imports of
    custom domains are left out.
    """
    used = {n for node in nodes for n in node.inputs}
    graph = b"".join(_length_delimited(1, node.raw) for node in nodes)
    graph += _length_delimited(2, name.encode())
    graph += b"".join(
        _length_delimited(5, init.raw) for key, init in model.initializers.items() if key in used
    )
    graph += b"".join(
        _length_delimited(5, tensor_bytes(key, array))
        for key, array in (extra_initializers or {}).items()
        if key in used
    )
    graph += b"".join(_length_delimited(11, _value_info(n, elem)) for n, elem in inputs)
    graph += b"".join(_length_delimited(12, _value_info(n, None)) for n in outputs)
    out = _key(1, _VARINT) + _encode_varint(model.ir_version)
    out += b"".join(
        _length_delimited(8, raw) for domain, raw in model._opset_raw if domain in ("", "ai.onnx")
    )
    return out + _length_delimited(7, graph)
