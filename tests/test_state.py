"""The agent's state directory: install, activate, roll back, checkpoints, crash leftovers."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

import exporters
import models
from edge_agent.state import StateError, StateStore
from exporters.artifact import ArtifactError


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("arts")
    made = []
    for version in ("1", "2"):
        model = models.create("lenet5").eval()
        made.append(
            exporters.export(
                model,
                root / f"v{version}",
                "onnx-portable",
                name="digits",
                version=version,
                input_shape=(1, 32, 32),
            )
        )
    return made


def test_install_activate_and_rollback(tmp_path, artifacts):
    store = StateStore(tmp_path / "state")
    assert store.active() is None and store.last_good() is None
    first = store.install(artifacts[0])
    store.activate(first)
    assert store.active() == first and store.last_good() is None
    second = store.install(artifacts[1])
    store.activate(second)
    assert store.active() == second and store.last_good() == first
    assert (second.version, first.version) == ("2", "1")
    assert store.rollback() == first
    assert store.active() == first and store.last_good() == second
    # a fresh store on the same directory sees the same pointers (what a restart does)
    again = StateStore(tmp_path / "state")
    assert again.active() == first


def test_install_is_idempotent_and_reads_tar(tmp_path, artifacts):
    store = StateStore(tmp_path)
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(artifacts[0], arcname="a")
    from_tar = store.install(tar)
    from_dir = store.install(artifacts[0])
    assert from_tar == from_dir
    assert len([p for p in (tmp_path / "artifacts").iterdir()]) == 1


def test_tampered_artifact_is_refused_and_leaves_nothing(tmp_path, artifacts):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(artifacts[0], bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[-3] ^= 0x01
    (bad / "model.onnx").write_bytes(bytes(data))
    store = StateStore(tmp_path / "state")
    with pytest.raises(ArtifactError, match="SHA-256"):
        store.install(bad)
    assert list((tmp_path / "state" / "artifacts").iterdir()) == []


def test_rollback_without_history_is_a_clear_error(tmp_path, artifacts):
    store = StateStore(tmp_path)
    store.activate(store.install(artifacts[0]))
    with pytest.raises(StateError, match="no last-good artifact"):
        store.rollback()


def test_old_slots_are_collected(tmp_path, artifacts, tmp_path_factory):
    store = StateStore(tmp_path)
    refs = [store.install(a) for a in artifacts]
    model = models.create("lenet5").eval()
    third = exporters.export(
        model,
        tmp_path_factory.mktemp("v3") / "a",
        "onnx-portable",
        name="digits",
        version="3",
        input_shape=(1, 32, 32),
    )
    refs.append(store.install(third))
    for ref in refs:
        store.activate(ref)
    slots = sorted(p.name for p in (tmp_path / "artifacts").iterdir())
    assert slots == sorted([refs[1].path.name, refs[2].path.name])


def test_crash_leftovers_are_cleaned(tmp_path):
    (tmp_path / "artifacts" / ".install-abc" / "x").mkdir(parents=True)
    StateStore(tmp_path)
    assert not (tmp_path / "artifacts" / ".install-abc").exists()


def test_pointer_to_missing_slot_is_a_clear_error(tmp_path):
    store = StateStore(tmp_path)
    (tmp_path / "active.json").write_text(
        json.dumps({"slot": "gone", "name": "n", "version": "1", "sha256": "x"})
    )
    with pytest.raises(StateError, match="missing; deploy the model again"):
        store.active()


def test_checkpoint_round_trip_and_torn_write(tmp_path):
    store = StateStore(tmp_path)
    assert store.load_checkpoint() is None
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, np.int64)}
    store.save_checkpoint(tensors, {"round": 4, "accuracy": 0.5})
    loaded, meta = store.load_checkpoint()
    assert meta["round"] == 4 and np.array_equal(loaded["w"], tensors["w"])
    # a crash after writing the next model file but before its meta.json: the old pair wins
    (tmp_path / "learning" / "checkpoint-5.safetensors").write_bytes(b"torn")
    loaded, meta = store.load_checkpoint()
    assert meta["round"] == 4
    store.save_checkpoint({"w": tensors["w"] + 1}, {"round": 5})
    loaded, meta = store.load_checkpoint()
    assert meta["round"] == 5 and loaded["w"][0, 0] == 1
    assert sorted(p.name for p in (tmp_path / "learning").iterdir()) == [
        "checkpoint-5.safetensors",
        "meta.json",
    ]


def test_counters_and_config_overrides(tmp_path):
    store = StateStore(tmp_path)
    assert store.counters() == {} and store.config_overrides() == {}
    store.save_counters({"forged": 3})
    store.save_config_overrides({"heartbeat_s": 5})
    again = StateStore(tmp_path)
    assert again.counters() == {"forged": 3}
    assert again.config_overrides() == {"heartbeat_s": 5}


def test_unwritable_state_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StateError, match="--state-dir"):
        StateStore(blocker / "state")


def test_history_keeps_the_latest_events_and_survives_a_damaged_file(tmp_path, artifacts, caplog):
    store = StateStore(tmp_path / "s")
    one, two = (store.install(a) for a in artifacts[:2])
    store.activate(one, event="initial")
    store.activate(two)
    store.record("rollback", store.rollback())
    events = StateStore(tmp_path / "s").history()  # read back from the directory
    assert [(e["event"], e["version"]) for e in events] == [
        ("initial", one.version),
        ("deploy", two.version),
        ("rollback", one.version),
    ]
    assert events[0]["sha256"] == one.sha256 and all(e["ts"] > 0 for e in events)
    with pytest.raises(ValueError, match="history event must be one of"):
        store.record("reboot", one)

    (tmp_path / "s" / "history.json").write_text("{torn")
    assert store.history() == [] and "history.json is unreadable" in caplog.text
    store.activate(two)  # a damaged history never stops a deploy; the next event replaces it
    assert [e["event"] for e in store.history()] == ["deploy"]

    for _ in range(120):
        store.activate(one)
    assert len(store.history()) == 100
