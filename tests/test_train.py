"""The training loop: accuracy on digits, clipping, determinism, resume, run layout, KD."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import models
from models import checkpoint
from models.training import distillation_loss
from toolkit import train as train_mod
from toolkit.data import load_dataset
from toolkit.train import (
    ShapeError,
    TrainConfig,
    check_input,
    evaluate,
    make_model,
    train,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def run(config: TrainConfig, digits, out=None, **kwargs):
    train_data, test_data = digits
    return train(config, out, progress=False, train_data=train_data, test_data=test_data, **kwargs)


def lenet_config(**overrides) -> TrainConfig:
    args = {"model": "lenet5", "epochs": 2, "batch_size": 64, "lr": 3e-3, "seed": 0}
    return TrainConfig(**(args | overrides))


def bireal_config(**overrides) -> TrainConfig:
    args = {
        "model": "bireal18",
        "model_args": {"width": 0.25, "stem": "imagenet"},
        "epochs": 3,
        "batch_size": 64,
        "lr": 1e-2,
        "seed": 0,
    }
    return TrainConfig(**(args | overrides))


TINY_BIREAL = {"width": 0.125, "stem": "imagenet"}


def binary_convs(model: torch.nn.Module) -> list[models.BinaryConv2d]:
    return [m for m in model.modules() if isinstance(m, models.BinaryConv2d)]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def lenet_run(digits, tmp_path_factory):
    """A float LeNet-5 trained on digits, written to a run directory."""
    out = tmp_path_factory.mktemp("runs") / "lenet"
    return run(lenet_config(epochs=6), digits, out)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"schedule": "step"}, "unknown schedule 'step'"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"kd_alpha": 1.5}, "kd_alpha"),
        ({"threads": 0}, "threads"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


# --------------------------------------------------------------------------- accuracy


def test_float_lenet_learns_digits(lenet_run):
    history = lenet_run.history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    # observed 0.96 (seeds 0-3: 0.94-0.97)
    assert history[-1]["test_accuracy"] >= 0.90
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for record in history:
        assert 0.0 <= record["test_accuracy"] <= 1.0
        assert math.isfinite(record["train_loss"]) and record["images_per_s"] > 0
    # cosine schedule: the learning rate decays over the run
    assert history[-1]["lr"] < history[0]["lr"] <= 3e-3


@pytest.fixture(scope="module")
def bireal_result(digits):
    return run(bireal_config(), digits)


def test_small_bireal_learns_digits(bireal_result):
    # observed 0.88 (seeds 0-3: 0.86-0.88); chance is 0.10
    assert bireal_result.final["test_accuracy"] >= 0.75
    assert len(binary_convs(bireal_result.model)) == 16


def test_latent_weights_stay_clipped(bireal_result, digits):
    for conv in binary_convs(bireal_result.model):
        assert conv.weight.abs().max() <= 1.0
    # with a huge learning rate the clip must actually bind, and still hold
    result = run(
        bireal_config(epochs=1, lr=0.5, schedule="constant", model_args=TINY_BIREAL),
        digits,
    )
    weights = torch.cat([c.weight.detach().flatten() for c in binary_convs(result.model)])
    assert weights.abs().max() == 1.0
    assert (weights.abs() == 1.0).sum() > 0


def _by_hand(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy and mean cross-entropy from one plain forward pass, computed here."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).double()
    labels = torch.from_numpy(y)
    correct = int((logits.argmax(1) == labels).sum())
    log_probs = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    loss = -log_probs[torch.arange(len(labels)), labels].mean()
    return correct / len(labels), float(loss)


def test_evaluate(lenet_run, digits):
    _, test_data = digits
    model = lenet_run.model
    accuracy, loss = _by_hand(model, test_data.x, test_data.y)
    assert 0.5 < accuracy < 1.0  # a trained model, and not a trivial one
    model.train()
    result = evaluate(model, test_data)  # 450 samples: batches of 256 and 194
    assert result["samples"] == len(test_data) == 450
    assert result["accuracy"] == accuracy
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert model.training  # mode is restored
    # the training loop reports the same numbers for its last epoch
    assert lenet_run.final["test_accuracy"] == accuracy
    assert lenet_run.final["test_loss"] == pytest.approx(loss, rel=1e-5)
    # small batches and a scattered subset: the same as by hand
    assert evaluate(model, test_data, batch_size=7)["loss"] == pytest.approx(loss, rel=1e-5)
    picked = np.array([449, 3, 17, 200, 0, 51, 52, 300, 120, 8])
    subset = evaluate(model, test_data, indices=picked)
    sub_accuracy, sub_loss = _by_hand(model, test_data.x[picked], test_data.y[picked])
    assert subset["samples"] == 10 and subset["accuracy"] == sub_accuracy
    assert subset["loss"] == pytest.approx(sub_loss, rel=1e-5)


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_gives_identical_weights(digits):
    a = run(lenet_config(), digits)
    b = run(lenet_config(), digits)
    assert_same_weights(a.model, b.model)
    assert [h["test_accuracy"] for h in a.history] == [h["test_accuracy"] for h in b.history]
    c = run(lenet_config(seed=1), digits)
    assert not torch.equal(a.model.features[0].weight, c.model.features[0].weight)


def test_resume_after_shorter_run_matches_uninterrupted(digits, tmp_path):
    # a constant schedule does not depend on the total number of epochs, so a 2-epoch run
    # extended to 3 must follow exactly the uninterrupted 3-epoch trajectory
    config = bireal_config(model_args=TINY_BIREAL, schedule="constant", lr=3e-3)
    full = run(config, digits, tmp_path / "full")
    run(TrainConfig(**{**config.__dict__, "epochs": 2}), digits, tmp_path / "resumed")
    resumed = run(config, digits, tmp_path / "resumed", resume=True)
    assert_same_weights(full.model, resumed.model)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["test_accuracy"] for h in resumed.history] == [
        h["test_accuracy"] for h in full.history
    ]
    # the run directory's final weights are the resumed ones
    assert_same_weights(checkpoint.load(tmp_path / "resumed").model, full.model)
    saved_history = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [h["test_accuracy"] for h in saved_history] == [h["test_accuracy"] for h in full.history]


def test_resume_after_interruption_matches_uninterrupted(digits, tmp_path, monkeypatch):
    # cosine schedule, run killed during epoch 3, resumed with the very same config
    config = bireal_config(model_args=TINY_BIREAL, lr=3e-3)
    full = run(config, digits, tmp_path / "full")

    real_evaluate = train_mod.evaluate
    calls = {"n": 0}

    def crashing_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed during epoch 3")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", crashing_evaluate)
    with pytest.raises(KeyboardInterrupt, match="killed during epoch 3"):
        run(config, digits, tmp_path / "cut")
    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    assert train_mod.latest_checkpoint(tmp_path / "cut").name == "epoch_0002"

    resumed = run(config, digits, tmp_path / "cut", resume=True)
    assert_same_weights(full.model, resumed.model)
    assert [h["test_accuracy"] for h in resumed.history] == [
        h["test_accuracy"] for h in full.history
    ]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in full.history]


def test_resume_refuses_a_changed_config(lenet_run, digits):
    with pytest.raises(ValueError, match="cannot resume.*lr"):
        run(lenet_config(epochs=6, lr=1e-2), digits, lenet_run.out, resume=True)


def test_resume_needs_checkpoints(digits, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no intermediate checkpoint"):
        run(lenet_config(), digits, tmp_path / "empty", resume=True)
    with pytest.raises(ValueError, match="resume needs"):
        run(lenet_config(), digits, None, resume=True)


# --------------------------------------------------------------------------- run directory


def test_run_directory_layout(lenet_run):
    out = lenet_run.out
    top = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "spec.json", "history.json", "config.json", "checkpoints"} <= top
    # only the newest keep_checkpoints (2) intermediate checkpoints remain
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["epoch_0005", "epoch_0006"]
    for name in kept:
        assert checkpoint.is_checkpoint(out / "checkpoints" / name)
        assert (out / "checkpoints" / name / "optimizer.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "lenet5" and config["epochs"] == 6 and config["seed"] == 0
    history = json.loads((out / "history.json").read_text())
    assert history == lenet_run.history
    loaded = checkpoint.load(out)
    assert loaded.meta["dataset"] == "digits"
    assert loaded.meta["epoch"] == 6 and loaded.meta["complete"] is True
    assert loaded.meta["channels"] == 1 and loaded.meta["image_size"] == 32
    assert loaded.spec["args"]["in_channels"] == 1
    assert_same_weights(loaded.model, lenet_run.model)


def test_existing_run_without_resume(lenet_run, digits):
    before = (lenet_run.out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        run(lenet_config(), digits, lenet_run.out)
    assert (lenet_run.out / "model.safetensors").read_bytes() == before


# --------------------------------------------------------------------------- distillation


def test_distillation_from_a_saved_teacher(lenet_run, digits):
    config = lenet_config(epochs=1, teacher=str(lenet_run.out), kd_alpha=0.7, kd_temperature=3.0)
    result = run(config, digits)
    assert math.isfinite(result.final["train_loss"])
    assert result.final["train_loss"] > 0
    assert 0.0 <= result.final["test_accuracy"] <= 1.0
    # the teacher changes the run: same seed and batches, another loss and other weights
    alone = run(lenet_config(epochs=1), digits)
    assert result.final["train_loss"] != pytest.approx(alone.final["train_loss"], rel=1e-3)
    assert not torch.equal(result.model.features[0].weight, alone.model.features[0].weight)


@pytest.mark.slow
def test_distillation_alone_copies_a_constant_teacher(digits, tmp_path):
    """kd_alpha = 1: the labels are ignored and the student learns the teacher's answer."""
    train_data, test_data = digits
    teacher = make_model("lenet5", train_data)
    favourite = torch.zeros(10)
    favourite[3] = 4.0  # softmax: 0.86 on class 3 for every image
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.zero_()
        teacher.classifier[-1].bias.copy_(favourite)
    checkpoint.save(teacher, tmp_path / "teacher")
    config = lenet_config(
        epochs=2, teacher=str(tmp_path / "teacher"), kd_alpha=1.0, kd_temperature=1.0
    )
    result = run(config, digits)
    student = result.model.eval()
    with torch.no_grad():
        probs = torch.softmax(student(torch.from_numpy(test_data.x)), dim=1)
    assert (probs.argmax(1) == 3).float().mean() >= 0.95
    target = torch.softmax(favourite, dim=0)
    assert (probs.mean(0) - target).abs().max() < 0.1
    # so it scores about the share of 3s, where the labels alone reach ~0.9
    share = float((test_data.y == 3).mean())
    assert result.final["test_accuracy"] == pytest.approx(share, abs=0.05)


def test_distillation_loss_math():
    torch.manual_seed(0)
    logits = torch.randn(6, 10)
    labels = torch.randint(0, 10, (6,))
    ce = torch.nn.functional.cross_entropy(logits, labels)
    # identical teacher: the KL term vanishes
    same = distillation_loss(logits, logits.clone(), labels, alpha=0.9, temperature=4.0)
    assert same == pytest.approx(0.1 * float(ce), abs=1e-6)
    # alpha = 0 is plain cross-entropy whatever the teacher says
    other = distillation_loss(logits, torch.randn(6, 10), labels, alpha=0.0, temperature=4.0)
    assert other == pytest.approx(float(ce), abs=1e-6)
    assert distillation_loss(logits, torch.randn(6, 10), labels, 0.9, 4.0) > same


# --------------------------------------------------------------------------- shapes


def test_check_input_wrong_channels():
    model = models.create("lenet5", in_channels=1)
    with pytest.raises(ShapeError, match=r"1-channel.*3 channel.*--channels 1"):
        check_input(model, (3, 32, 32))
    check_input(model, (1, 32, 32))


def test_check_input_wrong_size():
    model = models.create("lenet5", image_size=32)
    with pytest.raises(ShapeError, match="--image-size 32"):
        check_input(model, (1, 28, 28))


def test_train_reports_shape_errors(digits):
    with pytest.raises(ShapeError, match="--channels 3"):
        run(lenet_config(model_args={"in_channels": 3}), digits)


def test_make_model_sizes_the_model_from_the_data(digits):
    train_data, _ = digits
    model = make_model("bireal18", train_data, width=0.125)
    args = models.spec_of(model)["args"]
    assert args["in_channels"] == 1 and args["num_classes"] == 10 and args["width"] == 0.125
