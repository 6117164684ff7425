"""Checkpoints: safetensors + spec.json, exact round trips, and clear errors on damage."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import models
from bitfleet import checkpoint as checkpoint_format
from models import checkpoint
from models.checkpoint import CheckpointError
from models.training import make_optimizer

PICKLE_MAGIC = b"\x80"


def small_bireal() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create("bireal18", width=0.125, in_channels=1, num_classes=5)


def batch(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)


def adam_steps(model, optimizer, steps: int = 3) -> None:
    model.train()
    for i in range(steps):
        x, y = batch(i)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.fixture
def saved(tmp_path):
    model = small_bireal()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    adam_steps(model, optimizer)  # non-trivial weights, BN statistics and Adam moments
    path = checkpoint.save(model, tmp_path / "ckpt", optimizer=optimizer, dataset="digits", epoch=3)
    return model, optimizer, path


def test_round_trip_gives_identical_outputs(saved):
    model, _, path = saved
    loaded = checkpoint.load(path)
    assert loaded.spec == models.spec_of(model)
    assert models.spec_of(loaded.model) == models.spec_of(model)
    assert not loaded.model.training  # loaded for inference
    model.eval()
    x, _ = batch(42)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert loaded.meta == {"dataset": "digits", "epoch": 3}


def test_files_are_safetensors_and_json_never_pickle(saved):
    _, _, path = saved
    names = sorted(p.name for p in path.iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "spec.json"]
    for name in names:
        assert not (path / name).read_bytes().startswith(PICKLE_MAGIC), name
    document = json.loads((path / "spec.json").read_text())
    assert document["format"] == checkpoint.CHECKPOINT_FORMAT
    assert document["model"]["name"] == "bireal18"
    assert set(document["files"]) == {"model.safetensors", "optimizer.safetensors"}
    assert all(len(digest) == 64 for digest in document["files"].values())
    # the weights file is a plain safetensors file any reader can open
    from safetensors.torch import load_file

    tensors = load_file(path / "model.safetensors")
    assert set(tensors) == set(saved[0].state_dict())
    assert checkpoint.is_checkpoint(path)


def test_without_optimizer_only_two_files(tmp_path):
    model = small_bireal()
    path = checkpoint.save(model, tmp_path / "c")
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "spec.json"]
    loaded = checkpoint.load(path)
    assert not loaded.has_optimizer
    with pytest.raises(CheckpointError, match="no optimizer state"):
        loaded.load_optimizer_state(torch.optim.Adam(loaded.model.parameters()))


def test_resaving_without_optimizer_drops_the_stale_optimizer_file(saved):
    model, _, path = saved
    checkpoint.save(model, path)
    assert not (path / "optimizer.safetensors").exists()
    assert not checkpoint.load(path).has_optimizer


@pytest.mark.parametrize("kind", ["adam", "make_optimizer_adam", "make_optimizer_sgd"])
def test_optimizer_state_round_trips(kind, tmp_path):
    def new_optimizer(model):
        if kind == "adam":
            return torch.optim.Adam(model.parameters(), lr=1e-2)
        name = kind.rsplit("_", 1)[-1]
        return make_optimizer(model, name, lr=1e-2, weight_decay=1e-4)

    model = small_bireal()
    optimizer = new_optimizer(model)
    adam_steps(model, optimizer)
    path = checkpoint.save(model, tmp_path / "c", optimizer=optimizer)

    loaded = checkpoint.load(path)
    fresh_model = loaded.model
    fresh_optimizer = new_optimizer(fresh_model)
    loaded.load_optimizer_state(fresh_optimizer)
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]

    # one more identical step on both: the parameters must stay bit-identical
    fresh_model.train()
    model.train()
    x, y = batch(99)
    for m, opt in ((model, optimizer), (fresh_model, fresh_optimizer)):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    for (name, a), b in zip(model.named_parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    # and the moments moved the same way
    state_a = optimizer.state_dict()["state"]
    state_b = fresh_optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for key, value in state_a[index].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, state_b[index][key]), (index, key)
            else:
                assert value == state_b[index][key]


def test_tampered_weights_fail_the_checksum(saved):
    _, _, path = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor's data
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        checkpoint.load(path)
    # verification can be skipped deliberately; the file is still a loadable safetensors
    checkpoint.load(path, verify=False)


def test_tampered_optimizer_fails_the_checksum(saved):
    _, _, path = saved
    with open(path / "optimizer.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(CheckpointError, match="checksum"):
        checkpoint.load(path)


def test_edited_spec_args_do_not_match_the_weights(saved):
    _, _, path = saved
    document = json.loads((path / "spec.json").read_text())
    document["model"]["args"]["width"] = 0.25
    # sealed again: a consistent spec that names another architecture (copied from another run)
    (path / "spec.json").write_text(json.dumps(checkpoint_format.seal(document)))
    with pytest.raises(CheckpointError, match="do not match"):
        checkpoint.load(path)


def test_spec_naming_an_unknown_model(saved):
    _, _, path = saved
    document = json.loads((path / "spec.json").read_text())
    document["model"]["name"] = "bireal99"
    (path / "spec.json").write_text(json.dumps(checkpoint_format.seal(document)))
    with pytest.raises(CheckpointError, match="cannot rebuild"):
        checkpoint.load(path)


def test_missing_or_wrong_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nowhere")
    a_file = tmp_path / "file.txt"
    a_file.write_text("hi")
    with pytest.raises(CheckpointError, match="not a directory"):
        checkpoint.load(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="spec.json"):
        checkpoint.load(empty)
    assert not checkpoint.is_checkpoint(empty)


def test_missing_weights_file(saved):
    _, _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint.load(path)


def test_unknown_format_and_bad_json(saved):
    _, _, path = saved
    document = json.loads((path / "spec.json").read_text())
    document["format"] = "bitfleet-checkpoint/99"
    (path / "spec.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="format"):
        checkpoint.load(path)
    (path / "spec.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(path)


def test_model_without_spec_cannot_be_saved(tmp_path):
    with pytest.raises(models.SpecError, match=r"Linear was not built by models\.create\(\)"):
        checkpoint.save(torch.nn.Linear(2, 2), tmp_path / "c")
    assert not (tmp_path / "c" / "spec.json").exists()


def test_an_edited_spec_fails_its_own_checksum(saved):
    _, _, path = saved
    document = json.loads((path / "spec.json").read_text())
    layer_args = json.dumps(document["model"])
    assert "approx_sign" in layer_args or "ste_sign" in layer_args
    document["model"] = json.loads(layer_args.replace("approx_sign", "ste_sign", 1))
    (path / "spec.json").write_text(json.dumps(document, indent=2))
    with pytest.raises(CheckpointError, match=r"spec\.json does not match its own checksum"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="its own checksum"):
        checkpoint.load(path, verify=False)  # the spec decides the network: always checked


def test_reformatting_the_spec_keeps_it_valid(saved):
    _, _, path = saved
    document = json.loads((path / "spec.json").read_text())
    (path / "spec.json").write_text(json.dumps(dict(reversed(document.items())), indent=7))
    checkpoint.load(path)


def test_a_legacy_spec_without_its_own_checksum_still_loads(saved):
    _, _, path = saved
    document = json.loads((path / "spec.json").read_text())
    del document["sha256"]
    document["format"] = "bitfleet-checkpoint/1"
    (path / "spec.json").write_text(json.dumps(document))
    checkpoint.load(path)
