"""edge_agent.protocol: topics, keys, signed frames, every drop reason, chunking, and fuzzing."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitfleet.errors import BitfleetError
from edge_agent.codecs import encode
from edge_agent.protocol import (
    BAD_REQUEST,
    COMMANDS,
    DEFAULT_CHUNK_BYTES,
    DROP_REASONS,
    KINDS,
    MAGIC,
    MISADDRESSED,
    OFFLINE,
    ONLINE,
    SCHEMA_VERSION,
    Command,
    CommandRequest,
    DeployArgs,
    DropCounter,
    Frame,
    FrameKind,
    FrameRejected,
    FrameVerifier,
    Keyring,
    ProtocolError,
    Reassembler,
    Reply,
    Topics,
    artifact_messages,
    check_tensors,
    command_body,
    decode_inputs,
    deploy_args,
    encode_inputs,
    expect_binary,
    expect_json,
    gossip_extra,
    gossip_info,
    infer_body,
    parse_command,
    parse_deploy_args,
    parse_infer,
    parse_reply,
    reply_body,
    seal_binary,
    seal_json,
    seal_tensors,
    split_chunks,
    state_body,
    state_online,
    validate_name,
)

FLEET_KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
KEYS = Keyring(FLEET_KEY)
NOW = 1_700_000_000.0


class FakeClock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def verifier(**kwargs) -> FrameVerifier:
    kwargs.setdefault("clock", FakeClock())
    return FrameVerifier(kwargs.pop("keyring", KEYS), **kwargs)


# what every FrameRejected says: its drop reason, then what went wrong
DROP_MESSAGE = (
    r"^(oversized|malformed|version|unsigned|forged|stale|future|replayed|bad_tensor): \S"
)


def reason(v: FrameVerifier, payload: bytes, **kwargs) -> str:
    with pytest.raises(FrameRejected, match=DROP_MESSAGE) as info:
        v.open(payload, **kwargs)
    return info.value.reason


def model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
        "bn.running_var": rng.uniform(0.5, 1.5, size=4).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


EXPECTED = {name: (a.shape, a.dtype) for name, a in model().items()}


def cmd(**kwargs) -> bytes:
    kwargs.setdefault("sender", "laptop")
    kwargs.setdefault("keyring", KEYS)
    kwargs.setdefault("now", NOW)
    return seal_json("cmd", {"id": "c1", "op": "ping"}, **kwargs)


def gossip(tensors=None, **kwargs) -> bytes:
    kwargs.setdefault("sender", "pi-1")
    kwargs.setdefault("keyring", KEYS)
    kwargs.setdefault("now", NOW)
    return seal_tensors(model() if tensors is None else tensors, **kwargs)


def signed_json(inner: dict | str, key: bytes = FLEET_KEY, **wrapper) -> bytes:
    """A JSON frame around an arbitrary payload, correctly signed: for crafting odd frames.

    ``inner`` is the payload object (written with json.dumps' default spacing) or its exact
    text; the wrapper's ``sender`` is the payload's unless ``wrapper`` says otherwise.
    """
    text = inner if isinstance(inner, str) else json.dumps(inner)
    sig = hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
    sender = inner.get("sender") if isinstance(inner, dict) else "laptop"
    frame = {"v": SCHEMA_VERSION, "sender": sender, "payload": text, "sig": sig, **wrapper}
    return json.dumps(frame).encode()


def payload_of(frame: bytes) -> dict:
    """The payload object of a JSON frame (envelope and body), unverified."""
    return json.loads(json.loads(frame)["payload"])


def signed_binary(header: dict, body: bytes, key: bytes = FLEET_KEY) -> bytes:
    """A binary frame from an arbitrary full header, correctly signed."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    signed = MAGIC + struct.pack(">I", len(head)) + head + body
    return signed + hmac.new(key, signed, hashlib.sha256).digest()


def envelope(**fields) -> dict:
    base = {"v": SCHEMA_VERSION, "type": "cmd", "sender": "laptop", "ts": NOW, "nonce": "ab" * 16}
    return {**base, **fields}


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# ----------------------------------------------------------------------------------- topics


def test_topics_build_and_parse_round_trip():
    topics = Topics("lab-1")
    for kind in KINDS:
        topic = getattr(topics, kind)("pi_2.a")
        assert topic == f"bitfleet/lab-1/dev/pi_2.a/{kind}"
        assert topics.parse(topic) == ("pi_2.a", kind)
    assert topics.artifact("lenet5", "1.2.0") == "bitfleet/lab-1/artifacts/lenet5/1.2.0"
    assert topics.all_states() == "bitfleet/lab-1/dev/+/state"
    assert topics.root == "bitfleet/lab-1"


@pytest.mark.parametrize(
    "topic",
    [
        "bitfleet/other/dev/pi-2/state",  # another fleet
        "bitfleet/lab-1/dev/pi-2/unknown",
        "bitfleet/lab-1/dev/pi-2/state/extra",
        "bitfleet/lab-1/dev/+/state",
        "bitfleet/lab-1/artifacts/lenet5/1",
        "bitfleet/lab-1/dev//state",
        "other/lab-1/dev/pi-2/state",
        "",
        None,
    ],
)
def test_topics_parse_rejects_foreign_topics(topic):
    assert Topics("lab-1").parse(topic) is None


@pytest.mark.parametrize(
    "bad", ["", "a/b", "a+b", "#", "x" * 65, "a b", "é", "a\n", ".", "..", 5, None]
)
def test_invalid_names_are_rejected(bad):
    with pytest.raises(ValueError, match="invalid device id") as info:
        validate_name(bad, "device id")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"invalid fleet name"):
        Topics(bad)
    with pytest.raises(ValueError, match=r"invalid device id"):
        Topics("lab").cmd(bad)
    with pytest.raises(ValueError, match=r"invalid artifact name"):
        Topics("lab").artifact(bad, "1")


def test_valid_names_pass():
    for name in ["a", "x" * 64, "pi-2", "Lab_1.v2", "..x"]:
        assert validate_name(name, "name") == name


# ------------------------------------------------------------------------------------- keys


def test_keyring_rejects_short_keys_naming_which():
    with pytest.raises(ValueError, match="fleet key is too short"):
        Keyring(b"x" * 31)
    with pytest.raises(ValueError, match="pi-2"):
        Keyring(FLEET_KEY, {"pi-2": b"short"})
    with pytest.raises(ValueError, match="invalid device id"):
        Keyring(FLEET_KEY, {"a/b": OTHER_KEY})


def test_keyring_key_for_and_repr():
    keys = Keyring(FLEET_KEY, {"pi-2": OTHER_KEY})
    assert keys.key_for("pi-2") == OTHER_KEY
    assert keys.key_for("pi-3") == FLEET_KEY
    assert keys.devices == ("pi-2",)
    assert FLEET_KEY.hex() not in repr(keys) and str(FLEET_KEY) not in repr(keys)


def test_keyring_from_file(tmp_path):
    path = tmp_path / "fleet.key"
    path.write_bytes(FLEET_KEY + b"\n")  # nothing is stripped: the newline is key material
    assert Keyring.from_file(path).key_for("any") == FLEET_KEY + b"\n"
    path.write_bytes(b"too short\n")
    with pytest.raises(ValueError, match=r"head -c 32 /dev/urandom > fleet.key"):
        Keyring.from_file(path)
    with pytest.raises(OSError, match=r"No such file or directory.*missing\.key"):
        Keyring.from_file(tmp_path / "missing.key")


# ---------------------------------------------------------------------------- round trips


def test_json_frame_round_trip():
    v = verifier()
    frame = v.open(seal_json("reply", {"id": "c1", "ok": True, "x": [1.5, "é"]},
                             sender="pi-2", keyring=KEYS, now=NOW))  # fmt: skip
    assert (frame.version, frame.type, frame.sender, frame.ts) == (2, "reply", "pi-2", NOW)
    assert len(frame.nonce) == 32 and int(frame.nonce, 16) >= 0
    assert frame.json == {"id": "c1", "ok": True, "x": [1.5, "é"]}
    assert frame.body == b"" and not frame.binary
    assert v.drops.total == 0


def test_json_frame_layout_signs_the_payload_bytes():
    payload = cmd()
    obj = json.loads(payload)
    assert list(obj) == ["v", "sender", "payload", "sig"]
    assert (obj["v"], obj["sender"], SCHEMA_VERSION) == (2, "laptop", 2)
    assert obj["sig"] == hmac.new(FLEET_KEY, obj["payload"].encode(), hashlib.sha256).hexdigest()
    inner = json.loads(obj["payload"])
    assert list(inner) == ["v", "type", "sender", "ts", "nonce", "body"]
    assert inner["v"] == SCHEMA_VERSION and inner["sender"] == "laptop" and inner["ts"] == NOW
    assert inner["body"] == {"id": "c1", "op": "ping"}
    assert MAGIC == b"BFF2"  # binary frames carry the same version


def test_frames_get_fresh_nonces_and_default_timestamps():
    a = payload_of(seal_json("cmd", {}, sender="laptop", keyring=KEYS))
    b = payload_of(seal_json("cmd", {}, sender="laptop", keyring=KEYS))
    assert a["nonce"] != b["nonce"]
    assert abs(a["ts"] - time.time()) < 60
    assert FrameVerifier(KEYS).open(seal_json("cmd", {}, sender="laptop", keyring=KEYS))


def test_binary_frame_round_trip():
    body = bytes(range(256)) * 3
    payload = seal_binary("blob", {"part": 2, "name": "x"}, body, sender="pi-1", keyring=KEYS,
                          now=NOW)  # fmt: skip
    assert payload[:4] == MAGIC
    (hlen,) = struct.unpack(">I", payload[4:8])
    header = json.loads(payload[8 : 8 + hlen])
    assert header == {"v": 2, "type": "blob", "sender": "pi-1", "ts": NOW,
                      "nonce": header["nonce"], "part": 2, "name": "x"}  # fmt: skip
    assert payload[8 + hlen : -32] == body
    frame = verifier().open(payload)
    assert frame.binary and frame.type == "blob" and frame.sender == "pi-1"
    assert frame.header == {"part": 2, "name": "x"}  # envelope fields are not repeated
    assert frame.body == body
    with pytest.raises(ValueError, match="binary"):
        _ = frame.json
    assert "body" not in repr(frame)  # a 1 MB body would flood a log


def test_empty_body_binary_frame_round_trip():
    frame = verifier().open(seal_binary("ping", {}, b"", sender="pi-1", keyring=KEYS, now=NOW))
    assert frame.body == b"" and frame.header == {}


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "sign"])
def test_tensor_frame_round_trip(codec):
    sent = model()
    extra = {"round": 3, "samples": 120, "model": "lenet5"}
    payload = gossip(codec=codec, binary_names=["conv.weight"], extra=extra)
    frame, tensors = verifier().open_tensors(payload, expected=EXPECTED)
    assert frame.type == "gossip" and frame.header == {**extra, "codec": codec}
    assert list(tensors) == list(sent)
    assert tensors["bn.num_batches_tracked"].dtype == np.int64
    assert tensors["bn.num_batches_tracked"] == 7
    if codec == "fp32":
        for name in sent:
            np.testing.assert_array_equal(tensors[name], sent[name])
    else:
        np.testing.assert_allclose(tensors["bn.running_var"], sent["bn.running_var"], atol=0.01)


def test_open_tensors_without_expected_still_checks_values():
    frame, tensors = verifier().open_tensors(gossip({"w": np.ones(3, np.float32)}))
    np.testing.assert_array_equal(tensors["w"], np.ones(3))
    with pytest.raises(FrameRejected, match="NaN"):
        verifier().open_tensors(gossip({"w": np.array([1, np.nan], np.float32)}))


def test_sealing_refuses_bad_input():
    with pytest.raises(ValueError, match="reserved"):
        seal_binary("blob", {"ts": 1}, b"", sender="pi-1", keyring=KEYS)
    with pytest.raises(ValueError, match="codec"):
        gossip(extra={"codec": "fp16"})
    with pytest.raises(ValueError, match="reserved"):
        gossip(extra={"sender": "pi-9"})
    with pytest.raises(ValueError, match="not JSON"):
        seal_json("cmd", {"x": float("nan")}, sender="laptop", keyring=KEYS)
    with pytest.raises(ValueError, match="not JSON"):
        seal_json("cmd", {"x": object()}, sender="laptop", keyring=KEYS)
    with pytest.raises(ValueError, match="invalid sender"):
        seal_json("cmd", {}, sender="a/b", keyring=KEYS)
    with pytest.raises(ValueError, match="invalid frame type"):
        seal_json("a b", {}, sender="laptop", keyring=KEYS)


# ------------------------------------------------------------------------------ rejections


def test_drop_reasons_are_the_documented_ones():
    assert DROP_REASONS == ("oversized", "malformed", "version", "unsigned", "forged", "stale",
                            "future", "replayed", "bad_tensor")  # fmt: skip


def test_unsigned_frames():
    obj = json.loads(cmd())
    del obj["sig"]
    assert reason(verifier(), json.dumps(obj).encode()) == "unsigned"
    assert reason(verifier(), json.dumps({**obj, "sig": ""}).encode()) == "unsigned"
    assert reason(verifier(), json.dumps({**obj, "sig": None}).encode()) == "unsigned"
    binary = gossip()
    assert reason(verifier(), binary[:-32] + bytes(32)) == "unsigned"


def test_forged_json_frames():
    payload = cmd()
    assert payload.count(b"ping") == 1 and payload.count(b"laptop") == 2
    assert reason(verifier(), payload.replace(b"ping", b"pong")) == "forged"  # body
    assert reason(verifier(), payload.replace(b"laptop", b"laptoq")) == "forged"  # both senders
    obj = json.loads(payload)
    sig = obj["sig"]
    obj["sig"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    assert reason(verifier(), json.dumps(obj).encode()) == "forged"  # signature


def test_a_payload_naming_another_sender_is_forged():
    # Signed with the fleet key, which "laptoq" uses too: only the sender check catches it,
    # and without it the frame would slip past the replay cache under another name.
    relabelled = cmd().replace(b'"sender":"laptop"', b'"sender":"laptoq"')
    assert reason(verifier(), relabelled) == "forged"
    inner = {**envelope(sender="pi-a"), "body": {}}
    assert reason(verifier(), signed_json(inner, sender="pi-b")) == "forged"


def test_json_frames_verify_however_the_sender_formats_its_json():
    """Another language's JSON: its own float format, key order, spacing and hex case."""
    ts = "1796109625.500000"
    text = (
        '{ "body" : {"name": "ping", "args": {}, "target": "pi-01", "id": 7},\n'
        '  "nonce": "00112233445566778899aabbccddeeff", "ts": ' + ts + ", "
        '"sender": "laptop", "type": "cmd", "v": 2 }'
    )
    sig = hmac.new(FLEET_KEY, text.encode(), hashlib.sha256).hexdigest().upper()
    frame = '{\n  "sig": "' + sig + '",\n  "payload": ' + json.dumps(text)
    frame += ',\n  "sender": "laptop", "v": 2.0e0 }\n'
    assert b"1796109625.500000" in frame.encode()
    with pytest.raises(FrameRejected, match="non-integer version"):
        verifier(clock=FakeClock(1796109625.0)).open(frame.encode())  # v must be an integer
    frame = frame.replace("2.0e0", "2")
    opened = verifier(clock=FakeClock(1796109625.0)).open(frame.encode())
    assert (opened.type, opened.sender, opened.ts) == ("cmd", "laptop", 1796109625.5)
    assert parse_command(opened.json, target="pi-01") == CommandRequest(7, "pi-01", "ping", {})


def test_flipping_any_byte_of_the_payload_is_forged():
    frame = cmd()
    start = frame.index(b'"payload":"') + len(b'"payload":"')
    end = frame.index(b'","sig":"')
    assert end - start > 100
    tried = 0
    for i in range(start, end):
        flipped = frame[i] ^ 0x01
        if b"\\" in frame[i : i + 1] + bytes([flipped]) or b'"' in bytes([frame[i], flipped]):
            continue  # would break the JSON string around the payload, not the payload
        assert reason(verifier(), flip(frame, i)) == "forged", (i, flip(frame, i))
        tried += 1
    assert tried > 100


def test_the_signature_is_checked_before_the_payload_is_parsed():
    not_json = signed_json("not JSON at all")
    assert reason(verifier(), not_json) == "malformed"  # signed: parsed, and refused
    obj = json.loads(not_json)
    obj["sig"] = "0" * 64
    assert reason(verifier(), json.dumps(obj).encode()) == "forged"  # never parsed
    del obj["sig"]
    assert reason(verifier(), json.dumps(obj).encode()) == "unsigned"


def test_forged_binary_frames():
    payload = gossip(extra={"round": 3})
    assert b'"round":3' in payload
    assert reason(verifier(), payload.replace(b'"round":3', b'"round":4')) == "forged"  # header
    assert reason(verifier(), flip(payload, len(payload) - 100)) == "forged"  # body
    assert reason(verifier(), flip(payload, len(payload) - 1)) == "forged"  # signature


def test_frames_signed_with_another_key_are_forged():
    other = Keyring(OTHER_KEY)
    assert reason(verifier(), cmd(keyring=other)) == "forged"
    assert reason(verifier(), gossip(keyring=other)) == "forged"


def test_replayed_frames():
    v = verifier()
    for payload in (cmd(), gossip()):
        v.open(payload)
        assert reason(v, payload) == "replayed"
    assert v.drops.snapshot()["replayed"] == 2


def test_stale_and_future_frames():
    v = verifier(max_age_s=120, max_future_s=30)
    assert reason(v, cmd(now=NOW - 121)) == "stale"
    assert reason(v, cmd(now=NOW + 31)) == "future"
    assert v.open(cmd(now=NOW - 119)).ts == NOW - 119
    assert v.open(cmd(now=NOW + 29)).ts == NOW + 29


def test_retained_frames_skip_age_and_replay_checks_only():
    v = verifier()
    old_state = seal_json("state", {"status": "offline"}, sender="pi-2", keyring=KEYS,
                          now=NOW - 3600)  # fmt: skip
    assert reason(v, old_state) == "stale"
    assert v.open(old_state, retained=True).json == {"status": "offline"}
    assert v.open(old_state, retained=True)  # delivered again on resubscribe
    assert reason(v, old_state.replace(b"offline", b"online!"), retained=True) == "forged"
    assert reason(v, cmd(now=NOW + 3600), retained=True) == "future"


def test_oversized_is_checked_before_parsing():
    v = verifier(max_frame_bytes=1000)
    assert reason(v, b"\xff" * 1001) == "oversized"
    assert reason(v, gossip()) == "oversized"
    assert v.open(cmd())  # small frames pass


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        b"{",
        b"[]",
        b"{}",
        b'{"v": "1"}',
        b'{"v": true}',
        b"\xff\xfe{}",
        b"{\xff}",
        b"BFX2" + bytes(100),  # unknown magic
        MAGIC + bytes(100),  # an empty header
        MAGIC,
        MAGIC + struct.pack(">I", 1000) + b"{}" + bytes(32),  # header overruns
        MAGIC + struct.pack(">I", 2) + b"[]" + bytes(32),
        b" " + b'{"v":2}',  # no sender, payload or sig
        b'{"v": 2, "sender": "laptop", "payload": {}, "sig": "' + b"ab" * 32 + b'"}',
        b'{"v": 2, "sender": "laptop", "payload": "{}", "sig": "ab", "x": 1}',
        b"[" * 100_000,
        "nope",  # not bytes at all
    ],
)
def test_malformed_frames(payload):
    assert reason(verifier(), payload) == "malformed"


@pytest.mark.parametrize(
    "change",
    [
        {"type": None},
        {"type": "a/b"},
        {"sender": 7},
        {"sender": ""},
        {"ts": "now"},
        {"ts": True},
        {"ts": 10**400},
        {"nonce": "xyz"},
        {"nonce": "AB" * 16},
        {"body": [1, 2]},
        {"extra_field": 1},
    ],
)
def test_malformed_json_envelopes_even_when_signed(change):
    obj = {**envelope(), "body": {}, **change}
    assert reason(verifier(), signed_json(obj)) == "malformed"


@pytest.mark.parametrize("payload", ["[]", "{}", '{"v": 2}', "", "{" * 100_000])
def test_malformed_payloads_even_when_signed(payload):
    assert reason(verifier(), signed_json(payload)) == "malformed"


def test_malformed_special_json():
    text = json.dumps({**envelope(), "body": {}})
    assert verifier().open(signed_json(text))
    assert reason(verifier(), signed_json(text.replace(str(NOW), "NaN"))) == "malformed"
    assert reason(verifier(), signed_json(text.replace(str(NOW), "1e999"))) == "malformed"
    obj = json.loads(signed_json(text))
    obj["sig"] = "zz" * 32
    assert reason(verifier(), json.dumps(obj).encode()) == "malformed"
    obj["sig"] = 5
    assert reason(verifier(), json.dumps(obj).encode()) == "malformed"
    surrogate = text.replace('"body": {}', '"body": {"x": "\\ud800"}')
    assert "ud800" in surrogate
    assert reason(verifier(), signed_json(surrogate)) == "malformed"  # in the payload
    obj = json.loads(signed_json(text))
    outer = json.dumps(obj).replace('"payload": "{', '"payload": "\\ud800{')
    assert reason(verifier(), outer.encode()) == "malformed"  # around it: no UTF-8 bytes to sign


def test_wrong_schema_version():
    assert reason(verifier(), signed_json({**envelope(), "body": {}}, v=3)) == "version"
    assert reason(verifier(), signed_json({**envelope(v=3), "body": {}})) == "version"  # inside
    header = {**envelope(v=3, type="gossip"), "codec": "fp32"}
    assert reason(verifier(), signed_binary(header, encode(model()))) == "version"
    assert reason(verifier(), b"BFF1" + gossip()[4:]) == "version"  # a version 1 binary frame
    # Checked before the signature: a receiver cannot know how another version signs.
    assert reason(verifier(), json.dumps({**envelope(v=0), "body": {}}).encode()) == "version"
    # A version 1 JSON frame: the envelope, body and a signature over their canonical JSON.
    old = {**envelope(v=1), "body": {}}
    canon = json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
    old["sig"] = hmac.new(FLEET_KEY, canon, hashlib.sha256).hexdigest()
    assert reason(verifier(), json.dumps(old).encode()) == "version"


def test_signature_is_checked_before_time():
    assert reason(verifier(), cmd(now=NOW - 1000, keyring=Keyring(OTHER_KEY))) == "forged"


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({**model(), "conv.weight": np.full((4, 2, 3, 3), np.nan, np.float32)}, "NaN"),
        ({**model(), "bn.running_var": np.array([1, np.inf, 1, 1], np.float32)}, "NaN or Inf"),
        ({**model(), "conv.weight": np.zeros((4, 2, 3, 2), np.float32)}, "shape"),
        ({**model(), "conv.weight": np.zeros((4, 2, 3, 3), np.int32)}, "dtype"),
        ({**model(), "bn.num_batches_tracked": np.array(7.0, np.float32)}, "dtype"),
        ({k: a for k, a in model().items() if k != "bn.running_var"}, "missing"),
        ({**model(), "stray": np.zeros(1, np.float32)}, "extra.*stray"),
    ],
)
def test_bad_tensors(tensors, match):
    v = verifier()
    with pytest.raises(FrameRejected, match=match) as info:
        v.open_tensors(gossip(tensors), expected=EXPECTED)
    assert info.value.reason == "bad_tensor"
    assert v.drops.snapshot()["bad_tensor"] == 1


def test_check_tensors_compares_dtype_kind_not_width():
    check_tensors({"w": np.zeros(2, np.float32)}, {"w": ((2,), np.float64)})
    check_tensors({"n": np.zeros((), np.int64)}, {"n": ((), "uint8")})
    with pytest.raises(FrameRejected, match="bool"):
        check_tensors({"m": np.zeros(2, bool)}, {"m": ((2,), np.int8)})
    with pytest.raises(FrameRejected, match=r"and 2 more"):
        check_tensors({}, {name: ((1,), "float32") for name in "abcde"})


def test_open_tensors_rejects_non_gossip_and_bad_payloads():
    assert _tensor_reason(cmd(), r"expected a binary gossip frame, got 'cmd'") == "malformed"
    blob = seal_binary("blob", {"codec": "fp32"}, encode(model()), sender="pi-1",
                       keyring=KEYS, now=NOW)  # fmt: skip
    assert _tensor_reason(blob, r"expected a binary gossip frame, got 'blob'") == "malformed"
    junk = seal_binary("gossip", {"codec": "fp32"}, b"not safetensors", sender="pi-1",
                       keyring=KEYS, now=NOW)  # fmt: skip
    assert _tensor_reason(junk, r"malformed payload") == "malformed"
    no_codec = seal_binary("gossip", {"codec": "zip"}, encode(model()), sender="pi-1",
                           keyring=KEYS, now=NOW)  # fmt: skip
    assert _tensor_reason(no_codec, r"unknown codec 'zip'") == "malformed"


def _tensor_reason(payload: bytes, message: str) -> str:
    with pytest.raises(FrameRejected, match=rf"^malformed: .*{message}") as info:
        verifier().open_tensors(payload)
    return info.value.reason


def test_rejection_message_is_one_line():
    with pytest.raises(FrameRejected, match=r"^malformed: JSON frame: JSONDecodeError") as info:
        verifier().open(b'{"v": 2,\n\n "type": 5')
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("malformed: ")
    assert info.value.detail and info.value.reason == "malformed"


# ------------------------------------------------------------------------ per-device keys


def test_per_device_keys():
    key_a, key_b = b"A" * 32, b"B" * 32
    laptop = verifier(keyring=Keyring(FLEET_KEY, {"pi-a": key_a, "pi-b": key_b}))
    device_a = Keyring(FLEET_KEY, {"pi-a": key_a})
    device_b = Keyring(FLEET_KEY, {"pi-b": key_b})
    assert laptop.open(cmd(sender="pi-a", keyring=device_a)).sender == "pi-a"
    assert laptop.open(gossip(sender="pi-a", keyring=device_a)).sender == "pi-a"
    # B claims to be A: its keyring signs "pi-a" with the fleet key, which A does not use.
    assert reason(laptop, cmd(sender="pi-a", keyring=device_b)) == "forged"
    # Nor does B's own key verify as A.
    assert reason(laptop, cmd(sender="pi-a", keyring=Keyring(key_b))) == "forged"
    # Senders without a device key still use the fleet key.
    assert laptop.open(cmd(sender="laptop", keyring=KEYS)).sender == "laptop"


def test_forged_frames_do_not_poison_the_nonce_cache():
    v = verifier()
    genuine = cmd()
    forged = genuine.replace(b"ping", b"boom")
    assert payload_of(forged)["nonce"] == payload_of(genuine)["nonce"]
    assert reason(v, forged) == "forged"
    assert v.open(genuine).json["op"] == "ping"
    assert reason(v, genuine) == "replayed"


def test_nonces_are_per_sender():
    a = signed_json({**envelope(sender="pi-a"), "body": {}})
    b = signed_json({**envelope(sender="pi-b"), "body": {}})  # same nonce, other sender
    v = verifier()
    assert v.open(a) and v.open(b)


def test_nonce_cache_forgets_only_what_is_stale_anyway():
    clock = FakeClock()
    v = verifier(clock=clock, max_age_s=120)
    first = cmd()
    v.open(first)
    clock.t += 60
    v.open(cmd(now=clock.t))
    assert len(v._nonces) == 2
    clock.t = NOW + 121  # the first frame is now stale: its nonce is forgotten
    v.open(cmd(now=clock.t))
    assert len(v._nonces) == 2
    assert reason(v, first) == "stale"


def test_nonce_cache_is_bounded_and_stays_safe_when_full():
    clock = FakeClock()
    v = verifier(clock=clock, nonce_capacity=3)
    frames = [cmd(now=NOW - 10 + i) for i in range(6)]
    for payload in frames:
        v.open(payload)
    assert len(v._nonces) == 3
    # Forgotten early, yet still not accepted again: the cache cannot tell, so it refuses.
    assert reason(v, frames[0]) == "replayed"
    assert reason(v, frames[5]) == "replayed"
    assert reason(v, cmd(now=NOW - 9)) == "replayed"  # as old as a forgotten one
    assert v.open(cmd(now=NOW))  # newer frames still pass


def test_verifier_is_thread_safe():
    v = verifier()
    frames = [cmd() for _ in range(50)]
    accepted: list[Frame] = []
    lock = threading.Lock()

    def work():
        for payload in frames:
            try:
                frame = v.open(payload)
            except FrameRejected:
                continue
            with lock:
                accepted.append(frame)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(accepted) == 50
    assert v.drops.snapshot()["replayed"] == 150


# ---------------------------------------------------------------------------------- counters


def test_drop_counter():
    drops = DropCounter()
    assert drops.snapshot() == dict.fromkeys(DROP_REASONS, 0) and drops.total == 0
    drops.count("forged")
    drops.count("chunk_timeout", 2)
    snap = drops.snapshot()
    assert snap["forged"] == 1 and snap["chunk_timeout"] == 2 and drops.total == 3
    assert set(DROP_REASONS) <= set(snap)

    threads = [
        threading.Thread(target=lambda: [drops.count("stale") for _ in range(500)])
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert drops.snapshot()["stale"] == 2000


def test_every_drop_is_logged_at_debug_level_with_its_reason(caplog):
    caplog.set_level(logging.DEBUG, logger="bitfleet.protocol")
    topic = "bitfleet/lab/dev/pi-01/cmd"
    obj = json.loads(cmd())
    del obj["sig"]
    unsigned = json.dumps(obj).encode()
    v = verifier()
    for payload, message in (
        (unsigned, r"^unsigned: no 'sig'"),
        (cmd(keyring=Keyring(OTHER_KEY)), r"^forged: bad signature"),
        (b"junk", r"^malformed: unknown frame start b'junk'"),
        (cmd(now=NOW - 999), r"^stale: 999\.0 s old"),
    ):
        with pytest.raises(FrameRejected, match=message):
            v.open(payload, topic=topic)
    with pytest.raises(FrameRejected, match=r"^bad_tensor: tensor 'w' holds NaN or Inf"):
        v.open_tensors(gossip({"w": np.array([np.nan], np.float32)}), topic="t/gossip")
    lines = [r.getMessage() for r in caplog.records if r.name == "bitfleet.protocol"]
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    assert len(lines) == 5, lines
    assert lines[0] == f"dropped frame: reason=unsigned sender=laptop topic={topic}: no 'sig'"
    assert lines[1].startswith(f"dropped frame: reason=forged sender=laptop topic={topic}: ")
    assert lines[2].startswith(f"dropped frame: reason=malformed topic={topic}: unknown frame")
    assert lines[3].startswith("dropped frame: reason=stale sender=laptop type=cmd topic=")
    assert lines[4].startswith("dropped frame: reason=bad_tensor sender=pi-1 type=gossip topic=")


def test_refused_bodies_and_chunk_timeouts_are_logged_too(caplog):
    caplog.set_level(logging.DEBUG, logger="bitfleet.protocol")
    with pytest.raises(ProtocolError, match=r"a command for 'pi-02' arrived at 'pi-01'"):
        parse_command(command_body("pi-02", "ping", {}, "c1"), target="pi-01")
    with pytest.raises(ProtocolError, match=r"expected a JSON 'cmd' frame, got a binary 'gossip'"):
        expect_json(verifier().open(gossip()), FrameKind.CMD)
    clock = FakeClock(0.0)
    r = Reassembler(timeout_s=5, clock=clock)
    r.add(chunk_frames(big_frame(), chunk_bytes=DEFAULT_CHUNK_BYTES)[0])
    clock.t = 6.0
    assert r.expire() == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "bitfleet.protocol"]
    assert lines[0].startswith("refused command body (dropped): reason=misaddressed: ")
    assert lines[1].startswith("refused frame: reason=bad_request sender=pi-1 type=gossip: ")
    assert lines[2].startswith("dropped transfer: reason=chunk_timeout sender=pi-1: ")


def test_verifier_counts_every_drop_once():
    v = verifier()
    for payload, message in (
        (b"junk", r"^malformed: unknown frame start b'junk'"),
        (cmd(keyring=Keyring(OTHER_KEY)), r"^forged: bad signature"),
        (cmd(now=NOW - 999), r"^stale: 999\.0 s old"),
    ):
        with pytest.raises(FrameRejected, match=message):
            v.open(payload)
    with pytest.raises(FrameRejected, match=r"^malformed: unknown frame start b'junk'"):
        v.receive(b"junk")
    snap = v.drops.snapshot()
    assert (snap["malformed"], snap["forged"], snap["stale"]) == (2, 1, 1)
    assert v.drops.total == 4


# ---------------------------------------------------------------------------------- chunking


def blob(n: int) -> bytes:
    return np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes()


def big_frame(n: int = 1_000_000, sender: str = "pi-1") -> bytes:
    return seal_binary(
        "artifact", {"name": "lenet5"}, blob(n), sender=sender, keyring=KEYS, now=NOW
    )


def chunk_frames(payload: bytes, **kwargs) -> list[Frame]:
    kwargs.setdefault("sender", "pi-1")
    v = verifier()
    return [v.open(c) for c in split_chunks(payload, keyring=KEYS, now=NOW, **kwargs)]


def test_small_payloads_are_not_chunked():
    payload = cmd()
    assert split_chunks(payload, sender="laptop", keyring=KEYS) == [payload]
    assert split_chunks(b"x" * 10, chunk_bytes=10, sender="laptop", keyring=KEYS) == [b"x" * 10]
    with pytest.raises(ValueError, match="chunk_bytes"):
        split_chunks(payload, chunk_bytes=0, sender="laptop", keyring=KEYS)


def test_chunking_round_trip_shuffled_with_duplicates():
    payload = big_frame()
    chunks = split_chunks(payload, sender="pi-1", keyring=KEYS, now=NOW)
    assert len(chunks) == 4
    assert all(len(c) <= DEFAULT_CHUNK_BYTES + 1024 for c in chunks)
    v = verifier()
    frames = [v.open(c) for c in chunks]
    headers = [f.header for f in frames]
    assert [h["index"] for h in headers] == [0, 1, 2, 3]
    assert {h["total"] for h in headers} == {4} and {h["size"] for h in headers} == {len(payload)}
    assert headers[0]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert len({h["transfer"] for h in headers}) == 1

    shuffled = frames[:]
    random.Random(0).shuffle(shuffled)
    # Duplicates of the first three arrive before the last missing chunk.
    order = shuffled[:3] + [shuffled[1], shuffled[0], shuffled[2]] + shuffled[3:]
    r = Reassembler()
    results = [r.add(f) for f in order]
    assert results[:-1] == [None] * 6
    assert results[-1] == payload
    assert r.pending_bytes == 0 and len(r) == 0
    # A late duplicate of a completed transfer is ignored, not held as a new transfer.
    assert r.add(shuffled[0]) is None
    assert r.pending_bytes == 0 and len(r) == 0


def test_receive_reassembles_and_opens_the_inner_frame():
    payload = big_frame()
    chunks = split_chunks(payload, sender="pi-1", keyring=KEYS, now=NOW)
    random.Random(3).shuffle(chunks)
    v = verifier()
    out = [v.receive(c) for c in chunks]
    assert out[:-1] == [None, None, None]
    inner = out[-1]
    assert inner.type == "artifact" and inner.header == {"name": "lenet5"}
    assert inner.body == blob(1_000_000)
    assert v.reassembler.pending_bytes == 0 and len(v.reassembler) == 0
    assert v.receive(cmd()).type == "cmd"  # unchunked frames come straight back
    assert reason(v, chunks[0]) == "replayed"  # the broker delivering a chunk twice
    assert reason(v, payload) == "replayed"  # the inner frame's nonce was recorded too


def test_receive_ignores_resent_chunks_and_chunked_gossip_decodes():
    big = {"w": np.random.default_rng(2).normal(size=(300, 300)).astype(np.float32)}
    payload = gossip(big)
    first = split_chunks(payload, sender="pi-1", keyring=KEYS, transfer_id="t1", now=NOW)
    again = split_chunks(payload, sender="pi-1", keyring=KEYS, transfer_id="t1", now=NOW)
    v = verifier()
    assert v.receive(first[0]) is None
    assert v.receive(again[0]) is None  # re-sealed duplicate: new nonce, same index: ignored
    for c in first[1:-1]:
        assert v.receive(c) is None
    frame = v.receive(first[-1])
    _, tensors = v.open_tensors(frame, expected={"w": ((300, 300), "float32")})
    np.testing.assert_array_equal(tensors["w"], big["w"])
    assert v.drops.total == 0


def test_chunks_of_chunks_are_refused():
    inner = split_chunks(big_frame(600_000), sender="pi-1", keyring=KEYS, now=NOW)[0]
    outer = split_chunks(inner, chunk_bytes=100_000, sender="pi-1", keyring=KEYS, now=NOW)
    v = verifier()
    for c in outer[:-1]:
        assert v.receive(c) is None
    with pytest.raises(FrameRejected, match="another chunk"):
        v.receive(outer[-1])


def test_reassembled_frame_may_exceed_the_frame_limit_but_not_the_reassembly_limit():
    payload = big_frame(300_000)
    chunks = split_chunks(payload, chunk_bytes=100_000, sender="pi-1", keyring=KEYS, now=NOW)
    v = verifier(max_frame_bytes=200_000)
    assert [v.receive(c) for c in chunks][-1].body == blob(300_000)
    small = verifier(max_frame_bytes=200_000, reassembly_max_bytes=250_000)
    with pytest.raises(FrameRejected, match=r"^chunk_overflow: .* bytes exceeds 250000") as info:
        small.receive(chunks[0])
    assert info.value.reason == "chunk_overflow"
    assert small.drops.snapshot()["chunk_overflow"] == 1


def test_reassembly_timeout():
    clock = FakeClock(0.0)
    drops = DropCounter()
    r = Reassembler(timeout_s=30, clock=clock, drops=drops)
    a = chunk_frames(big_frame(600_000), transfer_id="a")
    b = chunk_frames(big_frame(600_000), transfer_id="b")
    assert r.add(a[0]) is None
    clock.t = 20
    assert r.add(b[0]) is None
    assert r.pending_bytes == 2 * DEFAULT_CHUNK_BYTES
    clock.t = 31  # a idle 31 s, b idle 11 s
    assert r.expire() == 1
    assert len(r) == 1 and r.pending_bytes == DEFAULT_CHUNK_BYTES
    clock.t = 60  # add() expires b first, then starts a afresh
    assert r.add(a[1]) is None
    assert len(r) == 1 and r.pending_bytes == DEFAULT_CHUNK_BYTES
    assert drops.snapshot()["chunk_timeout"] == 2
    assert r.expire() == 0


def test_reassembly_memory_bounds():
    frames = chunk_frames(big_frame(600_000), transfer_id="t")
    too_big = Reassembler(max_bytes=500_000)
    with pytest.raises(FrameRejected, match="exceeds") as info:
        too_big.add(frames[0])  # declares a payload larger than the whole budget
    assert info.value.reason == "chunk_overflow" and too_big.pending_bytes == 0

    r = Reassembler(max_bytes=700_000)
    r.add(frames[0])
    other = chunk_frames(big_frame(600_000), transfer_id="u")
    r.add(other[0])
    with pytest.raises(FrameRejected, match="buffer full") as info:
        r.add(other[1])
    assert info.value.reason == "chunk_overflow"
    assert r.pending_bytes <= 700_000

    few = Reassembler(max_transfers=1)
    few.add(frames[0])
    with pytest.raises(FrameRejected, match="transfers") as info:
        few.add(other[0])
    assert info.value.reason == "chunk_overflow"


def test_reassembly_sha_mismatch():
    payload = big_frame(600_000)
    frames = chunk_frames(payload, transfer_id="t")
    r = Reassembler()
    last = frames[-1]
    corrupted = Frame(**{**last.__dict__, "body": flip(last.body, 0)})
    for f in frames[:-1]:
        assert r.add(f) is None
    with pytest.raises(FrameRejected, match="sha256") as info:
        r.add(corrupted)
    assert info.value.reason == "malformed" and r.pending_bytes == 0 and len(r) == 0


def test_reassembly_rejects_inconsistent_chunks():
    frames = chunk_frames(big_frame(600_000), transfer_id="t")

    def variant(frame: Frame, **header) -> Frame:
        return Frame(**{**frame.__dict__, "header": {**frame.header, **header}})

    for bad in (
        {"total": 4},
        {"size": 600_001},
        {"sha256": "0" * 64},
    ):
        r = Reassembler()
        r.add(frames[0])
        with pytest.raises(FrameRejected, match="contradicts") as info:
            r.add(variant(frames[1], **bad))
        assert info.value.reason == "malformed" and r.pending_bytes == 0
    for bad, message in (
        ({"index": 3}, r"index 3 of 3"),
        ({"index": -1}, r"index -1 of 3"),
        ({"index": True}, r"index, total and size must be integers"),
        ({"total": 0}, r"index 0 of 0"),
        ({"size": "big"}, r"index, total and size must be integers"),
        ({"sha256": "XYZ"}, r"sha256 must be 64 lowercase hex characters"),
        ({"transfer": "a/b"}, r"bad transfer id"),
    ):
        with pytest.raises(FrameRejected, match=rf"^malformed: chunk: {message}") as info:
            Reassembler().add(variant(frames[0], **bad))
        assert info.value.reason == "malformed"
    with pytest.raises(FrameRejected, match="not a chunk"):
        Reassembler().add(verifier().open(cmd()))


# ------------------------------------------------------------------- what frames carry


def test_protocol_errors_are_bitfleet_errors_and_value_errors():
    assert issubclass(ProtocolError, BitfleetError) and issubclass(ProtocolError, ValueError)
    assert issubclass(FrameRejected, ProtocolError)
    assert FrameRejected("forged", "x").reason == "forged"
    with pytest.raises(ProtocolError, match="invalid device id"):
        validate_name("a/b", "device id")
    with pytest.raises(ProtocolError, match=r"body is not JSON: Out of range float"):
        seal_json("cmd", {"x": float("nan")}, sender="laptop", keyring=KEYS)


def test_frame_kinds_and_command_names_are_the_wire_strings():
    assert KINDS == ("state", "telemetry", "cmd", "reply", "gossip", "infer")
    assert (FrameKind.ARTIFACT, FrameKind.CHUNK) == ("artifact", "chunk")
    assert COMMANDS == (
        "ping",
        "status",
        "deploy",
        "rollback",
        "learn.start",
        "learn.stop",
        "config.set",
        "logs",
        "history",
        "metrics",
    )
    assert (Command.LEARN_START, Command.CONFIG_SET) == ("learn.start", "config.set")


def test_topic_filters_and_artifact_chunk_topics():
    topics = Topics("lab")
    assert topics.every_device(FrameKind.STATE) == topics.all_states() == "bitfleet/lab/dev/+/state"
    assert topics.all_replies() == "bitfleet/lab/dev/+/reply"
    assert topics.all_telemetry() == "bitfleet/lab/dev/+/telemetry"
    assert topics.artifact_chunk("m", "2", 7) == "bitfleet/lab/artifacts/m/2/7"
    assert topics.artifact_chunks("m", "2") == "bitfleet/lab/artifacts/m/2/#"
    with pytest.raises(ProtocolError, match="unknown topic kind"):
        topics.every_device("artifact")
    for bad in (-1, True, "0"):
        with pytest.raises(ProtocolError, match="chunk index"):
            topics.artifact_chunk("m", "2", bad)
    with pytest.raises(ProtocolError, match=r"invalid artifact version 'a/b'"):
        topics.artifact_chunks("m", "a/b")


def test_command_body_round_trip_and_wire_bytes():
    body = command_body("pi-7", Command.DEPLOY, {"name": "m"}, "c1")
    assert body == {"id": "c1", "target": "pi-7", "name": "deploy", "args": {"name": "m"}}
    assert parse_command(body, target="pi-7") == CommandRequest(
        "c1", "pi-7", "deploy", {"name": "m"}
    )
    assert parse_command(command_body("pi-7", "ping", None, 3)).args == {}
    # what the laptop sent before these helpers existed: the same payload but for the nonce
    by_hand = {"target": "pi-7", "name": "deploy", "args": {"name": "m"}, "id": "c1"}
    sealed = [seal_json("cmd", b, sender="laptop", keyring=KEYS, now=NOW) for b in (body, by_hand)]
    strip = [{k: v for k, v in payload_of(x).items() if k != "nonce"} for x in sealed]
    assert strip[0] == strip[1]
    # a newer client may send a command this device does not know: the table answers that
    assert parse_command(command_body("pi-7", "reboot", {}, "c2")).name == "reboot"


@pytest.mark.parametrize(
    "target, name, args, request_id, message",
    [
        ("a/b", "ping", {}, "1", r"invalid device id 'a/b'"),
        ("pi-7", "", {}, "1", r"invalid command name ''"),
        ("pi-7", "x y", {}, "1", r"invalid command name 'x y'"),
        ("pi-7", "ping", [1], "1", r"args must be a JSON object, got list"),
        ("pi-7", "ping", {1: 2}, "1", r"args must be a JSON object, got dict"),
        ("pi-7", "ping", {}, 1.5, r"request id must be a string or an integer, got float"),
        ("pi-7", "ping", {}, ["1"], r"request id must be a string or an integer, got list"),
    ],
)
def test_command_body_refuses_bad_commands(target, name, args, request_id, message):
    with pytest.raises(ProtocolError, match=message):
        command_body(target, name, args, request_id)


@pytest.mark.parametrize(
    "body, reason, message",
    [
        ([], BAD_REQUEST, r"a command body must be a JSON object, got list"),
        ("ping", BAD_REQUEST, r"a command body must be a JSON object, got str"),
        ({}, BAD_REQUEST, r"a command must name its target device"),
        ({"target": "a/b", "name": "ping"}, BAD_REQUEST, r"a command must name its target device"),
        ({"target": 7, "name": "ping"}, BAD_REQUEST, r"a command must name its target device"),
        ({"target": "pi-7", "name": "ping", "id": {"x": 1}}, BAD_REQUEST,
         r"request id must be a string or an integer, got dict"),
        ({"target": "pi-7", "name": "ping", "id": True}, BAD_REQUEST,
         r"request id must be a string or an integer, got bool"),
        ({"target": "pi-8", "name": "ping", "id": "1"}, MISADDRESSED,
         r"a command for 'pi-8' arrived at 'pi-7'"),
    ],
)  # fmt: skip
def test_parse_command_drops_bodies_that_cannot_be_answered(body, reason, message):
    with pytest.raises(ProtocolError, match=message) as info:
        parse_command(body, target="pi-7")
    assert info.value.reason == reason and info.value.reply is None


@pytest.mark.parametrize(
    "body, message",
    [
        ({"target": "pi-7", "id": "9", "name": 5}, "command name must be a string"),
        ({"target": "pi-7", "id": "9", "name": None}, "command name must be a string"),
        ({"target": "pi-7", "id": "9", "name": "ping", "args": [1]}, "args of 'ping'"),
        ({"target": "pi-7", "id": "9", "name": "ping", "args": "x"}, "must be a JSON object"),
    ],
)
def test_parse_command_answers_a_bad_command_to_this_device(body, message):
    with pytest.raises(ProtocolError, match=message) as info:
        parse_command(body, target="pi-7")
    reply = info.value.reply
    assert reply["id"] == "9" and reply["ok"] is False and message in reply["error"]
    assert parse_reply(reply).error == reply["error"]


def test_reply_body_round_trip():
    ok = reply_body("c1", "ping", {"pong": True})
    assert ok == {"id": "c1", "name": "ping", "ok": True, "result": {"pong": True}}
    assert parse_reply(ok) == Reply("c1", "ping", True, result={"pong": True})
    failed = reply_body(7, "deploy", error="no such artifact")
    assert failed == {"id": 7, "name": "deploy", "ok": False, "error": "no such artifact"}
    assert parse_reply(failed) == Reply(7, "deploy", False, error="no such artifact")
    assert parse_reply(reply_body(None, None)).result is None


@pytest.mark.parametrize(
    "body, message",
    [
        ([], r"a reply body must be a JSON object, got list"),
        ({"id": "1", "name": "ping"}, r"a reply must say 'ok': true or false"),
        ({"id": "1", "name": "ping", "ok": "yes", "result": 1},
         r"a reply must say 'ok': true or false"),
        ({"id": "1", "name": "ping", "ok": True}, r"a successful reply must carry a 'result'"),
        ({"id": "1", "name": "ping", "ok": False}, r"a failed reply must carry an 'error' string"),
        ({"id": "1", "name": "ping", "ok": False, "error": 5},
         r"a failed reply must carry an 'error' string"),
        ({"id": "1", "name": 5, "ok": True, "result": 1}, r"reply name must be a string, got int"),
        ({"id": 1.5, "name": "ping", "ok": True, "result": 1},
         r"request id must be a string or an integer, got float"),
    ],
)  # fmt: skip
def test_parse_reply_refuses_bad_replies(body, message):
    with pytest.raises(ProtocolError, match=message):
        parse_reply(body)


def test_infer_body_and_inputs_round_trip():
    batch = np.random.default_rng(0).normal(size=(3, 1, 4, 4)).astype(np.float32)
    body = infer_body(encode_inputs(batch), "r1")
    assert set(body) == {"id", "inputs"} and set(body["inputs"]) == {"b64", "shape"}
    request = parse_infer(json.loads(json.dumps(body)))
    assert request.id == "r1"
    np.testing.assert_array_equal(decode_inputs(request.inputs), batch)
    np.testing.assert_array_equal(decode_inputs(batch.tolist()), batch)
    assert parse_infer({"id": 2}).inputs is None
    with pytest.raises(ProtocolError, match=r"an infer body must be a JSON object, got list"):
        parse_infer([1, 2])
    with pytest.raises(
        ProtocolError, match=r"request id must be a string or an integer, got float"
    ):
        infer_body([], 1.5)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (None, "nested list"),
        ("abc", "nested list"),
        ([[1, 2], [3]], "rectangular"),
        ({"b64": "!!!", "shape": [1]}, "bad b64"),
        ({"b64": encode_inputs(np.zeros(4))["b64"], "shape": [3]}, "bad b64"),
        ({"b64": encode_inputs(np.zeros(4))["b64"]}, "bad b64"),
    ],
)
def test_decode_inputs_refuses_bad_batches_in_one_line(inputs, message):
    with pytest.raises(ProtocolError, match=message) as info:
        decode_inputs(inputs)
    assert "\n" not in str(info.value)


def test_deploy_args_round_trip_and_refusals():
    digest = "ab" * 32
    args = deploy_args("m", "2", digest)
    assert args == {"name": "m", "version": "2", "sha256": digest}
    assert parse_deploy_args(args) == DeployArgs("m", "2", digest, 60.0)
    assert parse_deploy_args(deploy_args("m", "2", digest, timeout_s=5)).timeout_s == 5.0
    for bad, message in (
        ({"name": "m", "version": "2"}, r"deploy needs string args name, version and sha256"),
        ({"name": "m", "version": "", "sha256": digest},
         r"deploy needs string args name, version and sha256"),
        ({"name": "m/x", "version": "2", "sha256": digest}, r"invalid artifact name 'm/x'"),
        ({"name": "m", "version": "2", "sha256": "AB" * 32},
         r"deploy sha256 must be 64 lowercase hex characters"),
        ({"name": "m", "version": "2", "sha256": "ab"},
         r"deploy sha256 must be 64 lowercase hex characters"),
        ({"name": "m", "version": "2", "sha256": digest, "timeout_s": 0},
         r"deploy timeout_s must be a positive number, got 0"),
        ({"name": "m", "version": "2", "sha256": digest, "timeout_s": "soon"},
         r"deploy timeout_s must be a positive number, got 'soon'"),
    ):  # fmt: skip
        with pytest.raises(ProtocolError, match=message):
            parse_deploy_args(bad)


def test_state_body_and_presence_checks():
    body = state_body(
        ONLINE,
        model="m",
        version="1",
        sha256=None,
        agent_version="0.1",
        learning=False,
        model_spec="lenet5",
        platform="aarch64",
        instance="a1b2",
        since=1_700_000_000.0,
    )
    assert body["status"] == "online" and body["capabilities"] == ["infer", "deploy", "learn"]
    assert (body["instance"], body["since"]) == ("a1b2", 1_700_000_000.0)
    assert state_online(body) and not state_online(body, learning=True)
    assert state_online({**body, "learning": True}, learning=True)
    assert not state_online({**body, "status": OFFLINE})
    with pytest.raises(
        ProtocolError, match=r"state status must be 'online' or 'offline', got 'asleep'"
    ):
        state_body(
            "asleep", **{k: v for k, v in body.items() if k not in ("status", "capabilities")}
        )


def test_gossip_header_round_trip():
    v = verifier()
    frame = v.open(gossip(extra=gossip_extra("lenet5", 4, 120)))
    info = gossip_info(expect_binary(frame, FrameKind.GOSSIP))
    assert (info.model, info.round, info.samples) == ("lenet5", 4, 120.0)
    for samples in (-1, 0, "many", True, None):
        odd = v.open(gossip(extra={"model": "m", "samples": samples}))
        assert gossip_info(odd).samples == 1.0


def test_expect_json_and_binary_check_the_frame_type():
    v = verifier()
    frame = v.open(cmd())
    assert expect_json(frame, FrameKind.CMD) == {"id": "c1", "op": "ping"}
    with pytest.raises(ProtocolError, match="expected a JSON 'reply' frame"):
        expect_json(frame, FrameKind.REPLY)
    with pytest.raises(ProtocolError, match="binary"):
        expect_binary(frame, FrameKind.CMD)
    with pytest.raises(
        ProtocolError, match=r"expected a JSON 'gossip' frame, got a binary 'gossip' frame"
    ) as info:
        expect_json(v.open(gossip()), FrameKind.GOSSIP)
    assert info.value.reason == BAD_REQUEST


def _artifact(n: int = 700_000, chunk_bytes: int = 200_000) -> tuple[dict, list[tuple[str, bytes]]]:
    return artifact_messages(
        Topics("lab"),
        blob(n),
        name="m",
        version="3",
        sender="laptop",
        keyring=KEYS,
        chunk_bytes=chunk_bytes,
    )


def _artifact_receiver(**kwargs) -> FrameVerifier:
    # as a deploying device: retained chunks, large frames, sealed just now
    return verifier(max_frame_bytes=2_000_000, clock=time.time, **kwargs)


def test_artifact_messages_reassemble_out_of_order_with_duplicates():
    args, messages = _artifact()
    assert args == {
        "name": "m",
        "version": "3",
        "sha256": hashlib.sha256(blob(700_000)).hexdigest(),
    }
    assert [t for t, _ in messages] == [f"bitfleet/lab/artifacts/m/3/{i}" for i in range(4)]
    chunks = [c for _, c in messages]
    order = [chunks[2], chunks[0], chunks[2], chunks[3], chunks[0], chunks[1]]
    v = _artifact_receiver()
    out = [v.receive(c, retained=True) for c in order]
    assert out[:-1] == [None] * 5
    frame = out[-1]
    assert frame.type == FrameKind.ARTIFACT and frame.body == blob(700_000)
    assert frame.header == args
    # the broker hands retained chunks out again (a second deploy): they are not "replayed"
    again = [v.receive(c, retained=True) for c in chunks]
    assert again[:-1] == [None] * 3 and again[-1] is None  # a completed transfer is ignored
    fresh = _artifact_receiver()
    assert [fresh.receive(c, retained=True) for c in chunks][-1].body == blob(700_000)
    assert v.drops.total == 0 and fresh.drops.total == 0


def test_artifact_with_a_missing_chunk_never_completes_and_times_out():
    _, messages = _artifact()
    chunks = [c for _, c in messages]
    clock = FakeClock(0.0)
    v = _artifact_receiver(reassembly_timeout_s=10)
    v.reassembler._clock = clock
    assert [v.receive(c, retained=True) for c in chunks[:2] + chunks[3:]] == [None] * 3
    assert len(v.reassembler) == 1
    clock.t = 11
    assert v.reassembler.expire() == 1
    assert v.drops.snapshot()["chunk_timeout"] == 1 and v.reassembler.pending_bytes == 0


def test_small_artifact_is_one_message():
    args, messages = _artifact(n=1000)
    assert len(messages) == 1 and messages[0][0].endswith("/m/3/0")
    frame = _artifact_receiver().receive(messages[0][1], retained=True)
    assert frame.type == FrameKind.ARTIFACT and frame.header["sha256"] == args["sha256"]


def test_retained_receive_skips_age_but_fresh_receive_does_not():
    _, messages = _artifact(n=1000)
    late = verifier(clock=FakeClock(time.time() + 3600), max_frame_bytes=2_000_000)
    assert late.receive(messages[0][1], retained=True) is not None
    with pytest.raises(FrameRejected, match=r"^stale: \d+(\.\d+)? s old") as info:
        late.receive(messages[0][1])
    assert info.value.reason == "stale"


# -------------------------------------------------------------------------------- fuzzing

VALID = [cmd(), gossip(), gossip(codec="sign", binary_names=["conv.weight"]), big_frame(2000)]


def content(frame: Frame) -> tuple:
    return (frame.type, frame.sender, frame.ts, frame.nonce, json.dumps(frame.header), frame.body)


VALID_CONTENT = {content(verifier().open(p)) for p in VALID}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_ever_raise_frame_rejected(data):
    for payload in (data, MAGIC + data, b"{" + data):
        with pytest.raises(FrameRejected, match=DROP_MESSAGE) as info:
            verifier().open(payload)
        assert info.value.reason in DROP_REASONS


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "length" and len(data) >= 8:
            data[4:8] = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_frames_only_ever_raise_frame_rejected(payload):
    for method in ("open", "receive", "open_tensors"):
        v = verifier()
        try:
            out = getattr(v, method)(payload)
        except FrameRejected as exc:
            assert exc.reason in DROP_REASONS
        else:  # only a mutation that changes nothing signed (JSON whitespace) may pass
            frame = out[0] if method == "open_tensors" else out
            assert content(frame) in VALID_CONTENT


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["transfer", "index", "total", "size", "sha256", "codec", "x"]),
        JSON_VALUES,
    ),
    st.binary(max_size=64),
    st.sampled_from(["chunk", "gossip"]),
)
def test_signed_frames_with_hostile_fields_only_raise_frame_rejected(header, body, ftype):
    payload = signed_binary({**envelope(type=ftype, sender="pi-1"), **header}, body)
    v = verifier()
    try:
        out = v.receive(payload)
        assert out is None or isinstance(out, Frame)
        if ftype == "gossip":
            v.open_tensors(out)
    except FrameRejected as exc:
        assert exc.reason in DROP_REASONS + ("chunk_overflow",)
    else:
        assert ftype == "chunk" and out is None  # a gossip body of random bytes never decodes
