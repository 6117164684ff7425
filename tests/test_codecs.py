"""edge_agent.codecs: round trips, sizes on the wire, and robustness against garbage frames."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from edge_agent.codecs import CODECS, CodecError, decode, encode, encoded_size

REPO = Path(__file__).resolve().parents[1]
BINARY = ("conv.weight", "fc.weight")


def model(seed: int = 0) -> dict[str, np.ndarray]:
    """A small binary-net-like state dict: float weights, BN statistics, an integer counter."""
    rng = np.random.default_rng(seed)
    return {
        "stem.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
        "conv.weight": rng.normal(size=(16, 8, 3, 3)).astype(np.float32),
        "fc.weight": rng.normal(size=(10, 17)).astype(np.float32),  # 170 bits: a ragged byte
        "bn.weight": rng.uniform(0.5, 1.5, size=16).astype(np.float32),
        "bn.running_var": rng.uniform(0.5, 1.5, size=16).astype(np.float32),
        "bn.num_batches_tracked": np.array(123456789012, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "index": np.arange(5, dtype=np.int32) - 2,
        "zeros": np.zeros((2, 3), np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(2.5, np.float32),
    }


def sign_of(t: np.ndarray) -> np.ndarray:
    """The codec's sign: zero counts as +1 (bit 0), as in the packed-bit artifacts."""
    return np.where(t < 0, -1.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_structure(codec: str) -> None:
    m = model()
    out = decode(encode(m, codec, BINARY))
    assert list(out) == list(m)  # the model's order
    for name, t in m.items():
        assert isinstance(out[name], np.ndarray), name
        assert out[name].shape == t.shape, name
        expected = t.dtype if t.dtype.kind in "biu" else np.float32
        assert out[name].dtype == expected, name
        assert out[name].flags.writeable
        if t.dtype.kind in "biu":
            np.testing.assert_array_equal(out[name], t)


def test_fp32_exact() -> None:
    m = model()
    out = decode(encode(m, "fp32", BINARY))
    for name, t in m.items():
        np.testing.assert_array_equal(out[name], t)


def test_fp32_casts_float64() -> None:
    t = np.linspace(-1, 1, 7)
    out = decode(encode({"w": t}))["w"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, t.astype(np.float32))


def test_fp16_within_half_precision() -> None:
    m = model()
    out = decode(encode(m, "fp16"))
    for name, t in m.items():
        if t.dtype.kind == "f":
            np.testing.assert_array_equal(out[name], t.astype(np.float16).astype(np.float32))
            np.testing.assert_allclose(out[name], t, rtol=2**-11, atol=0)


def test_int8_error_at_most_half_a_step() -> None:
    m = model()
    out = decode(encode(m, "int8"))
    for name, t in m.items():
        if t.dtype.kind != "f" or t.size == 0:
            continue
        peak = float(np.abs(t).max())
        scale = np.float32(peak / 127) if peak else np.float32(1)
        err = np.abs(out[name].astype(np.float64) - t)
        assert err.max() <= scale / 2 * (1 + 1e-6) + 1e-7 * peak, name
        assert np.abs(out[name]).max() <= peak * (1 + 1e-6), name  # no step past the peak
    np.testing.assert_array_equal(out["zeros"], 0)


def test_int8_codes_use_full_range() -> None:
    t = np.array([-3.0, -1.0, 0.0, 1.5, 3.0], np.float32)
    out = decode(encode({"w": t}, "int8"))["w"]
    scale = np.float32(3.0 / 127)
    np.testing.assert_array_equal(out, np.round(t / scale).astype(np.float32) * scale)
    assert out[0] == -out[-1]


def test_sign_exact() -> None:
    m = model()
    m["conv.weight"][0, 0, 0, :2] = 0.0  # zeros decode as +scale
    out = decode(encode(m, "sign", BINARY))
    for name in BINARY:
        t = m[name]
        scale = np.float32(np.abs(t.astype(np.float64)).mean())
        np.testing.assert_array_equal(out[name], scale * sign_of(t))
    # everything else falls back to fp16
    for name in ("stem.weight", "bn.weight", "bn.running_var", "scalar"):
        np.testing.assert_array_equal(out[name], m[name].astype(np.float16).astype(np.float32))


def test_int8_tiny_values() -> None:
    """A scale that would underflow float32 falls back to 1, like an all-zero tensor."""
    t = np.array([1e-300, -1e-300])
    out = decode(encode({"w": t}, "int8"))["w"]
    np.testing.assert_array_equal(out, 0)


def test_sign_bit_convention() -> None:
    """Bit 1 = negative, LSB first: [-1, +1, -1, -1] packs to 0b1101."""
    t = np.array([-2.0, 2.0, -2.0, -2.0], np.float32)
    data = encode({"w": t}, "sign", "w")  # a single name may be a plain string
    header_len = struct.unpack("<Q", data[:8])[0]
    assert data[8 + header_len :].rstrip(b" ") == bytes([0b1101])
    np.testing.assert_array_equal(decode(data)["w"], t)


def test_deterministic_bytes() -> None:
    """Same model, same bytes, also across processes (safetensors orders metadata randomly)."""
    code = (
        "import hashlib, sys; sys.path.insert(0, 'tests');"
        "from test_codecs import model; from edge_agent.codecs import encode;"
        "print(hashlib.sha256(encode(model(), 'sign', ['conv.weight'])).hexdigest())"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = {
        subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, check=True, capture_output=True
        ).stdout
        for _ in range(3)
    }
    assert len(runs) == 1


def test_binary_names_ignored_by_other_codecs() -> None:
    m = model()
    assert encode(m, "fp16", BINARY) == encode(m, "fp16")


@pytest.mark.parametrize(
    ("binary", "match"), [(["nope"], "not a tensor"), (["bn.num_batches_tracked"], "float")]
)
def test_bad_binary_names(binary: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode(model(), "sign", binary)


def test_encode_rejects() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        encode(model(), "fp8")
    with pytest.raises(ValueError, match="dtype"):
        encode({"c": np.ones(3, np.complex64)})
    with pytest.raises(ValueError, match="NaN"):
        encode({"w": np.array([1.0, np.nan], np.float32)}, "int8")
    with pytest.raises(ValueError, match="NaN"):
        encode({"w": np.array([1.0, np.inf], np.float32)}, "sign", ["w"])


def test_sizes() -> None:
    big = {
        "w": np.random.default_rng(0).normal(size=(512, 512, 3, 3)).astype(np.float32),
        "n": np.array(7, np.int64),
    }
    fp32 = encoded_size(big, "fp32")
    assert fp32 == len(encode(big, "fp32"))
    assert fp32 >= big["w"].nbytes
    assert encoded_size(big, "fp16") / fp32 == pytest.approx(1 / 2, rel=0.01)
    assert encoded_size(big, "int8") / fp32 == pytest.approx(1 / 4, rel=0.01)
    assert encoded_size(big, "sign", ["w"]) / fp32 == pytest.approx(1 / 32, rel=0.01)
    sizes = [encoded_size(big, c, ["w"]) for c in CODECS]
    assert sizes == sorted(sizes, reverse=True)


def test_empty_model() -> None:
    for codec in CODECS:
        assert decode(encode({}, codec)) == {}


# --- decode on bad input ------------------------------------------------------------------------


def payload(metadata: object, tensors: dict[str, np.ndarray] | None = None) -> bytes:
    """A hand-made safetensors payload; ``metadata`` goes under the "bitfleet" key as JSON."""
    st_meta = None if metadata is None else {"bitfleet": json.dumps(metadata)}
    return save(tensors if tensors is not None else {"w": np.ones(3, np.float32)}, st_meta)


def meta(codec: str = "fp32", **specs: object) -> dict:
    specs = specs or {"w": {"enc": "raw", "dtype": "float32", "shape": [3]}}
    return {"format": "bitfleet-codec", "version": "1", "codec": codec, "tensors": specs}


def test_hand_made_payload_is_accepted() -> None:
    np.testing.assert_array_equal(decode(payload(meta()))["w"], np.ones(3))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "malformed"),
        (b"garbage!" * 4, "malformed"),
        (payload(None), "metadata"),
        (save({"w": np.ones(3, np.float32)}, {"bitfleet": "{"}), "malformed"),
        (payload([]), "not a JSON object"),
        (payload({"x": "y"}), "not a bitfleet"),
        (payload({**meta(), "version": "2"}), "not a bitfleet"),
        (payload({**meta(), "codec": "fp8"}), "unknown codec"),
        (payload({**meta(), "tensors": "{}"}), "JSON object"),
        (payload({**meta(), "tensors": []}), "JSON object"),
        (payload(meta(v={"enc": "raw", "dtype": "float32", "shape": [3]})), "do not match"),
        (payload(meta(w={"enc": "raw", "dtype": "float32", "shape": [4]})), "shape"),
        (payload(meta(w={"enc": "raw", "dtype": "float32", "shape": [-3]})), "bad shape"),
        (payload(meta(w={"enc": "raw", "dtype": "float32", "shape": "3"})), "bad shape"),
        (payload(meta(w={"enc": "raw", "dtype": "int32", "shape": [3]})), "metadata"),
        (payload(meta(w={"enc": "sign", "dtype": "float32", "shape": [3]})), "not valid"),
        (payload(meta(w="raw")), "not an object"),
        (
            payload(
                meta("int8", w={"enc": "int8", "dtype": "float32", "shape": [3], "scale": 1}),
                {"w": np.ones(3, np.int8)},
            ),
            None,
        ),
        (
            payload(
                meta("int8", w={"enc": "int8", "dtype": "float32", "shape": [3], "scale": 1e300}),
                {"w": np.ones(3, np.int8)},
            ),
            "scale",
        ),
        (
            payload(
                meta("sign", w={"enc": "sign", "dtype": "float32", "shape": [9], "scale": 1.0}),
                {"w": np.ones(1, np.uint8)},
            ),
            "packed",
        ),
        (
            payload(
                meta("sign", w={"enc": "sign", "dtype": "float32", "shape": [3], "scale": "1"}),
                {"w": np.ones(1, np.uint8)},
            ),
            "scale",
        ),
        (
            payload(
                meta("fp16", w={"enc": "fp16", "dtype": "float32", "shape": [3]}),
                {"w": np.ones(3, np.float32)},
            ),
            "stored as",
        ),
    ],
)
def test_decode_rejects(data: bytes, match: str | None) -> None:
    if match is None:  # the control case: a valid hand-made int8 payload
        np.testing.assert_array_equal(decode(data)["w"], np.ones(3))
        return
    with pytest.raises(CodecError, match=match) as info:
        decode(data)
    assert "\n" not in str(info.value)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(CodecError, match="payload must be bytes, got str"):
        decode("not bytes")  # type: ignore[arg-type]


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode(model(), "int8")
    assert decode(bytearray(data)).keys() == decode(memoryview(data)).keys()


def must_be_codec_error_or_valid(data: bytes) -> None:
    try:
        out = decode(data)
    except CodecError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(out, dict)
        assert all(isinstance(v, np.ndarray) for v in out.values())


VALID = [encode(model(), c, BINARY) for c in CODECS]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    must_be_codec_error_or_valid(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_random_header(body: bytes) -> None:
    """Random bytes behind a plausible length prefix reach the JSON parser."""
    must_be_codec_error_or_valid(struct.pack("<Q", len(body)) + body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.data())
def test_fuzz_truncated(valid: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(valid) - 1))
    with pytest.raises(CodecError, match="malformed payload"):
        decode(valid[:cut])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.data())
def test_fuzz_mutated(valid: bytes, data: st.DataObject) -> None:
    header_end = 8 + struct.unpack("<Q", valid[:8])[0]
    buf = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 8))):
        # mostly the header, where the structure is
        hi = header_end - 1 if data.draw(st.booleans()) else len(buf) - 1
        buf[data.draw(st.integers(0, hi))] = data.draw(st.integers(0, 255))
    must_be_codec_error_or_valid(bytes(buf))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_fuzz_metadata_json(valid: bytes, data: st.DataObject) -> None:
    """Rewrite the tensor metadata with random JSON: still CodecError or a valid dict."""
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=10,
    )
    decoded = decode(valid)
    name = data.draw(st.sampled_from(sorted(decoded)))
    header_end = 8 + struct.unpack("<Q", valid[:8])[0]
    header = json.loads(valid[8:header_end])
    bitfleet = json.loads(header["__metadata__"]["bitfleet"])
    key = data.draw(st.sampled_from(["enc", "dtype", "shape", "scale", "other"]))
    bitfleet["tensors"][name][key] = data.draw(json_values)
    header["__metadata__"]["bitfleet"] = json.dumps(bitfleet)
    raw = json.dumps(header).encode()
    must_be_codec_error_or_valid(struct.pack("<Q", len(raw)) + raw + valid[header_end:])


def test_no_torch_import() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "import sys, edge_agent.codecs; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
