"""digits-hard: determinism, shapes, disjoint source digits, the disk cache, and the CLI doors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from toolkit import digits_hard as dh
from toolkit.cli import app
from toolkit.data import DATASETS, DatasetError, load_dataset


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Every test here caches under one temporary folder, never the user's cache."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dh, "cache_dir", lambda: folder)
        yield folder


@pytest.fixture
def calls(monkeypatch):
    """Count the generator's runs (a cache hit runs it zero times)."""
    counter = {"generate": 0}
    real = dh.generate

    def counting(*args, **kwargs):
        counter["generate"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(dh, "generate", counting)
    return counter


# --------------------------------------------------------------------------- the generator


def test_same_seed_same_images_other_seed_other_images():
    first, again = dh.generate("train", 40, seed=0), dh.generate("train", 40, seed=0)
    np.testing.assert_array_equal(first.x, again.x)
    np.testing.assert_array_equal(first.sources, again.sources)
    other = dh.generate("train", 40, seed=1)
    assert not np.array_equal(first.x, other.x)
    np.testing.assert_array_equal(first.y, other.y)  # labels are i % 10 whatever the seed


def test_a_smaller_set_is_a_prefix_of_a_larger_one():
    small, large = dh.generate("train", 30), dh.generate("train", dh.CHUNK + 20)
    np.testing.assert_array_equal(small.x, large.x[:30])
    np.testing.assert_array_equal(small.sources, large.sources[:30])


def test_shapes_types_labels_and_balance():
    data = dh.generate("train", 123)
    assert data.x.shape == (123, 3, 32, 32) and data.x.dtype == np.uint8
    assert data.y.dtype == np.int64 and data.y.min() == 0 and data.y.max() == 9
    counts = np.bincount(data.y, minlength=10)
    assert counts.max() - counts.min() <= 1
    assert data.sources.shape == (123, 1 + dh.DIFFICULTY.clutter_slots)
    # the images use the whole range and are neither blank nor saturated
    assert 0.2 < data.x.std() / 255 < 0.5 and len(np.unique(data.x)) > 200


def test_each_image_is_drawn_from_a_source_digit_of_its_own_label():
    from sklearn.datasets import load_digits

    data = dh.generate("test", 200)
    np.testing.assert_array_equal(load_digits().target[data.sources[:, 0]], data.y)
    assert (data.sources[:, 1:] >= 0).any()  # clutter is drawn from other digits


def test_train_and_test_share_no_source_digit():
    split = dh.source_split(dh.DEFAULT_SEED)
    assert not set(split["train"]) & set(split["test"])
    assert len(split["train"]) + len(split["test"]) == 1797
    assert 440 <= len(split["test"]) <= 460  # stratified 25%
    train, test = dh.load("train", n=1000), dh.load("test")
    used_train = set(train.sources[train.sources >= 0].tolist())
    used_test = set(test.sources[test.sources >= 0].tolist())
    assert used_train and used_test and not used_train & used_test
    # digits and clutter fragments alike come only from their split's pool
    assert used_train <= set(split["train"].tolist())
    assert used_test <= set(split["test"].tolist())


def test_the_test_set_is_fixed_whatever_the_training_size():
    small = dh.make_loader("100")(None, "test", None, None)
    large = dh.make_loader("n=300")(None, "test", None, None)
    assert small[0].shape == (dh.TEST_SIZE, 3, 32, 32)
    np.testing.assert_array_equal(small[0], large[0])
    np.testing.assert_array_equal(small[1], large[1])


# --------------------------------------------------------------------------- the cache


def test_second_load_reads_the_cache(cache, calls):
    first = dh.load("train", n=77, seed=3)
    assert calls["generate"] == 1
    files = sorted(cache.glob("digits-hard-v*-train-seed3-n77-*.safetensors"))
    assert len(files) == 1
    again = dh.load("train", n=77, seed=3)
    assert calls["generate"] == 1
    np.testing.assert_array_equal(first.x, again.x)
    np.testing.assert_array_equal(first.sources, again.sources)
    dh.load("train", n=78, seed=3)  # another size is another file
    assert calls["generate"] == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_cache_file_is_regenerated(cache, calls, caplog, damage):
    seed = 10 + ["garbage", "truncated", "empty"].index(damage)
    good = dh.load("train", n=20, seed=seed)
    (path,) = cache.glob(f"digits-hard-v*-train-seed{seed}-n20-*.safetensors")
    data = path.read_bytes()
    damaged = {"garbage": b"not a safetensors file" * 10, "truncated": data[:-100], "empty": b""}
    path.write_bytes(damaged[damage])
    with caplog.at_level(logging.WARNING, logger="toolkit.digits_hard"):
        again = dh.load("train", n=20, seed=seed)
    assert calls["generate"] == 2
    np.testing.assert_array_equal(good.x, again.x)
    assert "regenerating" in caplog.text
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(path)["x"], good.x)  # rewritten whole
    dh.load("train", n=20, seed=seed)
    assert calls["generate"] == 2


def test_a_cache_of_other_knobs_is_not_used(cache, calls):
    dh.load("train", n=20, seed=20)
    harder = dh.Difficulty(noise=0.3)
    noisy = dh.load("train", n=20, seed=20, knobs=harder)
    assert calls["generate"] == 2
    assert not np.array_equal(noisy.x, dh.load("train", n=20, seed=20).x)
    assert calls["generate"] == 2


def test_an_unwritable_cache_costs_a_warning_not_the_data(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setattr(dh, "cache_dir", lambda: blocker / "datasets")
    with caplog.at_level(logging.WARNING, logger="toolkit.digits_hard"):
        data = dh.load("train", n=10, seed=30)
    assert data.x.shape == (10, 3, 32, 32)
    assert "could not cache digits-hard" in caplog.text


# --------------------------------------------------------------------------- load_dataset


def test_registered_without_files():
    assert "digits-hard" in DATASETS and not DATASETS["digits-hard"].needs_root


def test_load_dataset_normalises_with_train_statistics():
    train = load_dataset("digits-hard:200")
    test = load_dataset("digits-hard:200", split="test")
    assert train.name == "digits-hard" and len(train) == 200 and len(test) == dh.TEST_SIZE
    assert train.x.dtype == np.float32 and train.x.shape[1:] == (3, 32, 32)
    assert len(train.mean) == len(train.std) == 3
    assert test.mean == train.mean and test.std == train.std
    np.testing.assert_allclose(train.x.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(train.x.std(axis=(0, 2, 3)), 1.0, atol=1e-3)
    assert train.classes == tuple("0123456789")


def test_load_dataset_converts_channels_and_size():
    gray = load_dataset("digits-hard:50", channels=1, image_size=16)
    assert gray.x.shape == (50, 1, 16, 16)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("digits-hard:lots", "n must be an integer, got 'lots'"),
        ("digits-hard:0", "n must be between 1 and"),
        ("digits-hard:n=5,colour=red", "unknown option 'colour=red'"),
        ("digits-hard:n=5,seed=-1", "seed must be >= 0"),
        ("digits:500", "dataset 'digits' takes no options"),
    ],
)
def test_bad_options_are_one_clear_error(name, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset(name)


def test_options_parse():
    assert dh.parse_options("") == {"n": dh.DEFAULT_TRAIN_SIZE, "seed": dh.DEFAULT_SEED}
    assert dh.parse_options("500") == {"n": 500, "seed": 0}
    assert dh.parse_options("n=500, seed=2") == {"n": 500, "seed": 2}
    assert dh.parse_options("seed=2") == {"n": dh.DEFAULT_TRAIN_SIZE, "seed": 2}


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_train_and_eval_on_digits_hard_end_to_end(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train", "--model", "bireal18", "--width", "0.125", "--stem", "imagenet",
            "--dataset", "digits-hard:100", "--epochs", "1", "--out", str(out), "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dataset"] == "digits-hard:100" and 0.0 <= summary["test_accuracy"] <= 1.0
    result = runner.invoke(app, ["eval", str(out), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["samples"] == dh.TEST_SIZE
    assert document["accuracy"] == pytest.approx(summary["test_accuracy"])
    # the artifact's manifest carries the train split's per-channel normalisation
    art = tmp_path / "art"
    result = runner.invoke(
        app, ["export", str(out), "--format", "onnx-portable", "--out", str(art)]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((art / "manifest.json").read_text())
    train = load_dataset("digits-hard:100")
    assert manifest["input"]["normalisation"] == {"mean": list(train.mean), "std": list(train.std)}
    assert manifest["input"]["shape"][-3:] == [3, 32, 32]


@pytest.mark.slow
def test_simulate_on_digits_hard(monkeypatch, cache):
    monkeypatch.setattr(dh, "DEFAULT_TRAIN_SIZE", 60)
    result = CliRunner().invoke(
        app,
        [
            "simulate", "--dataset", "digits-hard", "--nodes", "2", "--rounds", "1",
            "--local-steps", "1", "--data", "iid", "--workers", "1", "--json", "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["methods"]["vc"]["rounds"] == 1
    assert list(cache.glob(f"digits-hard-v*-train-seed{dh.DEFAULT_SEED}-n60-*.safetensors"))
    sized = CliRunner().invoke(
        app,
        [
            "simulate", "--dataset", "digits-hard:40", "--nodes", "2", "--rounds", "1",
            "--local-steps", "1", "--data", "iid", "--workers", "1", "--json", "--no-progress",
        ],
    )  # fmt: skip
    assert sized.exit_code == 0, sized.output
    assert list(cache.glob(f"digits-hard-v*-train-seed{dh.DEFAULT_SEED}-n40-*.safetensors"))


def test_docs_list_every_knob_with_its_default():
    import dataclasses
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "datasets.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", text, flags=re.MULTILINE))
    defaults = dataclasses.asdict(dh.DIFFICULTY)
    assert rows.keys() == defaults.keys()
    for name, value in defaults.items():
        assert rows[name].strip() == str(value), f"docs/datasets.md: {name} is {value}"
