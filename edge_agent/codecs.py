"""How models travel on the wire: a ``name -> numpy array`` mapping to bytes and back.

Gossip pushes whole models over MQTT, often over slow links, so the codec decides most of the
bandwidth a fleet uses. Every payload is a safetensors file (never pickle: a frame from a peer
must not be able to run code); the codec name and what each tensor needs to be decoded live in
the safetensors ``__metadata__``, so :func:`decode` needs nothing out of band::

    from edge_agent.codecs import decode, encode, encoded_size

    data = encode(state, codec="sign", binary_names=["layer1.conv.weight"])
    model = decode(data)        # float tensors back as float32, integer tensors unchanged

Codecs (:data:`CODECS`):

- ``fp32``: float tensors as float32, bit-exact for float32 input;
- ``fp16``: float tensors as float16 (half the bytes), decoded to float32;
- ``int8``: per-tensor symmetric linear quantization, ``scale = max|t| / 127`` (1 for an
  all-zero tensor), ``q = round(t / scale)`` as int8; decoded ``q * scale`` as float32, so every
  element is within ``scale / 2`` of the original;
- ``sign``: tensors named in ``binary_names`` (the latent weights of binary layers, whose
  forward pass only sees their sign anyway) as 1 bit per element plus one float32 scale,
  ``mean|t|``; decoded as ``scale * sign(t)`` in float32. Bits use the packed-bit artifact
  convention (docs/design.md, section 3): bit 1 means negative, zero counts as positive (bit 0),
  packed LSB-first with ``numpy.packbits(bitorder="little")``. Every other float tensor (first
  and last layers, batch-norm parameters and statistics) travels as fp16: binary networks keep
  those in higher precision on purpose, 1 bit would wreck them, and fp32 would let these small
  tensors dominate a payload whose big tensors shrank 32 times. This choice is bitfleet's.

In every codec integer and boolean tensors (``num_batches_tracked``) keep their dtype and values
exactly; float tensors of any width decode as float32, the precision the models train in.

:func:`decode` is the boundary with untrusted peers: on any malformed input (bad bytes, unknown
codec, bad metadata, shape or size mismatch) it raises :class:`CodecError` with a one-line
message and nothing else, so the agent can count the frame as dropped. It checks structure only;
NaN/Inf in the values and the model's expected shapes are the protocol layer's checks.

Payload metadata: safetensors' ``__metadata__`` holds one key, ``"bitfleet"``, whose string
value is a JSON object ``{"format": "bitfleet-codec", "version": "1", "codec": ..., "tensors":
{name: {"enc", "dtype", "shape"[, "scale"]}}}``, the tensors in the model's order, ``scale`` for
the ``int8`` and ``sign`` encodings only. Each tensor is stored under its own name. One key,
because safetensors writes several metadata keys in a random order: with one, the same model
always encodes to the same bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from bitfleet.errors import BitfleetError

__all__ = ["CODECS", "CodecError", "decode", "encode", "encoded_size"]

#: Codec names, from the largest payload to the smallest.
CODECS: tuple[str, ...] = ("fp32", "fp16", "int8", "sign")

_META_KEY = "bitfleet"
_FORMAT = "bitfleet-codec"
_VERSION = "1"
_F32_MAX = float(np.finfo(np.float32).max)
# Largest int8 scale: 127 * scale stays finite in float32 even after rounding the scale.
_INT8_MAX_SCALE = _F32_MAX / 128

# Per-tensor encodings, and the codecs that may use each one.
_RAW, _FP16, _INT8, _SIGN = "raw", "fp16", "int8", "sign"
_ALLOWED = {
    "fp32": {_RAW},
    "fp16": {_RAW, _FP16},
    "int8": {_RAW, _INT8},
    "sign": {_RAW, _FP16, _SIGN},
}
# Dtypes that travel unchanged (integers, booleans, and float32 under fp32).
_RAW_DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32"]
)


class CodecError(BitfleetError, ValueError):
    """A payload that cannot be decoded; the agent drops the frame and counts it."""


def _spec_of(name: str, t: np.ndarray, codec: str, binary: bool) -> tuple[dict, np.ndarray]:
    """Choose the encoding of one tensor: its metadata entry and the array to store."""
    shape = list(t.shape)
    if t.dtype.kind in "biu":
        return {"enc": _RAW, "dtype": t.dtype.name, "shape": shape}, t
    if t.dtype.kind != "f":
        raise ValueError(f"tensor {name!r}: unsupported dtype {t.dtype}")
    spec: dict = {"dtype": "float32", "shape": shape}
    if codec == "sign" and binary:
        if not np.all(np.isfinite(t)):
            raise ValueError(f"tensor {name!r}: cannot sign-encode NaN/Inf")
        scale = np.float32(np.abs(t, dtype=np.float64).mean()) if t.size else np.float32(0)
        bits = np.packbits(t < 0, bitorder="little")
        return {**spec, "enc": _SIGN, "scale": float(scale)}, bits
    if codec == "int8":
        if not np.all(np.isfinite(t)):
            raise ValueError(f"tensor {name!r}: cannot int8-encode NaN/Inf")
        peak = float(np.abs(t, dtype=np.float64).max()) if t.size else 0.0
        if peak / 127 > _INT8_MAX_SCALE:
            raise ValueError(f"tensor {name!r}: values beyond {_INT8_MAX_SCALE * 127:.3g}")
        scale = np.float32(peak / 127)
        if not scale > 0:  # all zeros, or so tiny that the scale underflows float32
            scale = np.float32(1)
        q = np.clip(np.rint(t.astype(np.float64) / np.float64(scale)), -127, 127)
        return {**spec, "enc": _INT8, "scale": float(scale)}, q.astype(np.int8)
    if codec in ("fp16", "sign"):
        return {**spec, "enc": _FP16}, t.astype(np.float16)
    return {**spec, "enc": _RAW}, t.astype(np.float32)


def encode(
    model: Mapping[str, np.ndarray], codec: str = "fp32", binary_names: Iterable[str] = ()
) -> bytes:
    """Serialise ``model`` with ``codec`` into self-describing safetensors bytes.

    ``binary_names`` lists the tensors (a single name may be a plain string) that the ``sign``
    codec sends as 1 bit per element; other
    codecs ignore it, but every name must still be a float tensor of ``model`` so that a typo
    fails loudly instead of silently sending a binary layer at 16 bits. Raises ``ValueError``
    for an unknown codec, unsupported dtypes, or NaN/Inf in a tensor that is quantized.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; valid codecs: {', '.join(CODECS)}")
    binary = {binary_names} if isinstance(binary_names, str) else set(binary_names)
    for name in sorted(binary):
        if name not in model:
            raise ValueError(f"binary name {name!r} is not a tensor of the model")
        if np.asarray(model[name]).dtype.kind != "f":
            raise ValueError(f"binary name {name!r} is not a float tensor")
    specs: dict[str, dict] = {}
    stored: dict[str, np.ndarray] = {}
    for name, value in model.items():
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be strings, got {name!r}")
        spec, array = _spec_of(name, np.asarray(value), codec, name in binary)
        specs[name] = spec
        stored[name] = np.require(array, requirements="C")  # keeps 0-d arrays 0-d
    meta = {"format": _FORMAT, "version": _VERSION, "codec": codec, "tensors": specs}
    return _st_save(stored, metadata={_META_KEY: json.dumps(meta, separators=(",", ":"))})


def encoded_size(
    model: Mapping[str, np.ndarray], codec: str, binary_names: Iterable[str] = ()
) -> int:
    """Bytes that ``model`` takes on the wire with ``codec`` (before framing and signing)."""
    return len(encode(model, codec, binary_names))


def _read_metadata(data: bytes) -> dict:
    """The bitfleet metadata of a payload whose safetensors structure is already checked."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length].decode("utf-8"))
    st_meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(st_meta, dict) or not isinstance(st_meta.get(_META_KEY), str):
        raise CodecError("payload has no bitfleet codec metadata")
    meta = json.loads(st_meta[_META_KEY])
    if not isinstance(meta, dict):
        raise CodecError("bitfleet codec metadata is not a JSON object")
    return meta


def _check_scale(name: str, spec: dict, limit: float) -> np.float32:
    """A scale from the metadata as float32: finite, non-negative, and at most ``limit``.

    The limit keeps ``scale * code`` finite in float32, so a hostile scale cannot smuggle
    Inf into a decoded tensor (or an overflow warning into the agent's log).
    """
    scale = spec.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise CodecError(f"tensor {name!r}: missing or non-numeric scale")
    try:
        value = float(scale)
    except OverflowError:
        value = math.inf
    if not (0 <= value <= limit):  # also rejects NaN
        raise CodecError(f"tensor {name!r}: invalid scale {_one_line(repr(scale))}")
    return np.float32(value)


def _decode_tensor(name: str, spec: object, stored: np.ndarray, codec: str) -> np.ndarray:
    """Check one tensor's metadata against what was stored and undo its encoding."""
    if not isinstance(spec, dict):
        raise CodecError(f"tensor {name!r}: metadata is not an object")
    enc, dtype, shape = spec.get("enc"), spec.get("dtype"), spec.get("shape")
    if enc not in _ALLOWED[codec]:
        raise CodecError(f"tensor {name!r}: encoding {enc!r} is not valid in codec {codec!r}")
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise CodecError(f"tensor {name!r}: bad shape {shape!r}")
    shape_t = tuple(shape)
    if enc == _RAW:
        if dtype not in _RAW_DTYPES or stored.dtype.name != dtype:
            raise CodecError(f"tensor {name!r}: stored {stored.dtype.name}, metadata {dtype!r}")
        if codec != "fp32" and dtype == "float32":
            raise CodecError(f"tensor {name!r}: raw float32 is not valid in codec {codec!r}")
    elif dtype != "float32":
        raise CodecError(f"tensor {name!r}: {enc} decodes to float32, metadata says {dtype!r}")
    if enc == _SIGN:
        numel = math.prod(shape_t)
        if stored.dtype != np.uint8 or stored.shape != ((numel + 7) // 8,):
            raise CodecError(f"tensor {name!r}: {stored.size} packed bytes for shape {shape_t}")
        scale = _check_scale(name, spec, _F32_MAX)
        negative = np.unpackbits(stored, count=numel, bitorder="little").reshape(shape_t)
        return np.where(negative.astype(bool), -scale, scale).astype(np.float32)
    if stored.shape != shape_t:
        raise CodecError(f"tensor {name!r}: stored shape {stored.shape}, metadata {shape_t}")
    if enc == _INT8:
        if stored.dtype != np.int8:
            raise CodecError(f"tensor {name!r}: int8 encoding stored as {stored.dtype.name}")
        scale = _check_scale(name, spec, _INT8_MAX_SCALE)
        out = stored.astype(np.float32)
        out *= scale  # in place: ``stored * scale`` would turn a 0-d array into a numpy scalar
        return out
    if enc == _FP16:
        if stored.dtype != np.float16:
            raise CodecError(f"tensor {name!r}: fp16 encoding stored as {stored.dtype.name}")
        return stored.astype(np.float32)
    return np.array(stored)  # a writable copy: safetensors hands back views of the payload


def decode(data: bytes) -> dict[str, np.ndarray]:
    """Decode bytes from :func:`encode`; raises only :class:`CodecError` on bad input.

    Returns the tensors in the order they were encoded, as writable arrays: float tensors as
    float32, integer and boolean tensors in their own dtype, shapes exactly as sent.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        stored = _st_load(data)
        meta = _read_metadata(data)
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise CodecError(
                f"not a bitfleet codec payload version {_VERSION}: "
                f"format={meta.get('format')!r}, version={meta.get('version')!r}"
            )
        codec = meta.get("codec")
        if codec not in CODECS:
            raise CodecError(f"unknown codec {codec!r}; valid codecs: {', '.join(CODECS)}")
        specs = meta.get("tensors")
        if not isinstance(specs, dict):
            raise CodecError("tensor metadata is not a JSON object")
        if set(specs) != set(stored):
            missing, extra = sorted(set(specs) - set(stored)), sorted(set(stored) - set(specs))
            diff = _one_line(f"missing {missing}, extra {extra}")
            raise CodecError(f"tensors do not match metadata: {diff}")
        return {
            name: _decode_tensor(name, spec, stored[name], codec) for name, spec in specs.items()
        }
    except CodecError:
        raise
    except Exception as exc:  # safetensors, JSON, struct, numpy: all mean a malformed payload
        raise CodecError(f"malformed payload: {type(exc).__name__}: {_one_line(exc)}") from None
    except BaseException as exc:  # a Rust panic surfaces as pyo3's PanicException(BaseException)
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise CodecError(f"malformed payload: {type(exc).__name__}: {_one_line(exc)}") from None


def _one_line(exc: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
