"""`bitfleet fleet logs` and `bitfleet fleet infer` against in-process agents on Mosquitto.

``infer`` runs a LeNet-5 trained here for a few seconds on the bundled digits, exported with its
normalisation and labels, on PNG, JPEG and ``.npy`` files written from digits test images: the
command must convert them to what the model was trained on, or the labels come out wrong.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from agent_support import agent_config, ghost
from fleet_cli_support import flags, fleet_cli, one_line

from edge_agent.broker import free_port
from toolkit.cli.fleet_device_cmd import ModelInput, convert, softmax
from toolkit.data import load_dataset

LABELS = [f"digit {i}" for i in range(10)]
COUNT = 12  # test images sent as PNG files

pytestmark = pytest.mark.usefixtures("no_user_settings")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits) -> Path:
    """A LeNet-5 trained on digits for a few hundred steps; its artifact names labels and mean."""
    import torch

    import exporters
    import models
    from models import training

    train, _ = digits
    torch.manual_seed(0)
    model = models.create("lenet5")
    optimizer = training.make_optimizer(model, "adam", lr=3e-3)
    sampler = training.BatchSampler(train.x, train.y, 64)
    for epoch in range(3):  # ~96% on the test split
        training.train_steps(model, optimizer, sampler.epoch(0, epoch))
    return exporters.export(
        model.eval(),
        tmp_path_factory.mktemp("trained") / "art",
        "onnx-portable",
        name="digits",
        version="1",
        input_shape=(1, 32, 32),
        labels=LABELS,
        normalisation={"mean": list(train.mean), "std": list(train.std)},
    )


def _pixels(test, i: int) -> np.ndarray:
    """Test image ``i`` back on the 0..255 scale, H x W uint8 (as a camera would give it)."""
    raw = test.x[i, 0] * test.std[0] + test.mean[0]
    return np.clip(np.rint(raw * 255), 0, 255).astype(np.uint8)


@pytest.fixture
def images(tmp_path, digits) -> tuple[list[Path], list[int]]:
    from PIL import Image

    _, test = digits
    paths = []
    for i in range(COUNT):
        path = tmp_path / f"test{i}.png"
        Image.fromarray(_pixels(test, i)).save(path)
        paths.append(path)
    return paths, [int(y) for y in test.y[:COUNT]]


# ------------------------------------------------------------------------------ conversion
def test_convert_gives_the_training_numbers_from_pixels(digits):
    from PIL import Image

    train, test = digits
    model = ModelInput(1, 32, 32, train.mean, train.std)
    here = Path("x.png")
    grey = convert(Image.fromarray(_pixels(test, 0)), here, model)
    assert grey.shape == (1, 32, 32) and grey.dtype == np.float32
    assert np.abs(grey - test.x[0]).max() < 0.02  # only the 8-bit rounding differs
    # an RGB image at another size: grey, resized, the same numbers near enough
    big = Image.fromarray(_pixels(test, 0)).resize((64, 64), Image.Resampling.NEAREST)
    rgb = convert(big.convert("RGB"), here, model)
    assert rgb.shape == (1, 32, 32) and np.abs(rgb - test.x[0]).mean() < 0.1
    # uint8 arrays are pixels; float arrays are the model's input as is
    assert np.array_equal(convert(_pixels(test, 0), here, model), grey)
    assert np.array_equal(convert(test.x[0], here, model), test.x[0])
    with pytest.raises(ValueError, match=r"x.png holds a float32 array of shape \(3, 32, 32\)"):
        convert(np.zeros((3, 32, 32), np.float32), here, model)
    with pytest.raises(ValueError, match="NaN"):
        convert(np.full((1, 32, 32), np.nan, np.float32), here, model)
    three = ModelInput(3, 8, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    white = convert(Image.new("L", (4, 4), 255), here, three)
    assert white.shape == (3, 8, 8) and np.allclose(white, 2.0)


def test_model_input_reads_the_manifest_and_names_what_it_cannot_use():
    spec = {"shape": [None, 3, 24, 32], "normalisation": {"mean": [0, 0, 0], "std": [1, 2, 4]}}
    model = ModelInput.from_manifest(spec, "pi-01")
    assert model.shape == (3, 24, 32) and model.std == (1.0, 2.0, 4.0)
    assert ModelInput.from_manifest({"shape": [None, 1, 8, 8]}).mean == (0.0,)
    with pytest.raises(ValueError, match="pi-01's model takes input of shape"):
        ModelInput.from_manifest({"shape": [None, 10]}, "pi-01")
    with pytest.raises(ValueError, match="normalisation"):
        ModelInput.from_manifest({"shape": [None, 3, 8, 8], "normalisation": {"mean": [0]}})


def test_softmax_is_stable():
    probs = softmax(np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]]))
    assert np.allclose(probs, [[0.5, 0.5], [0.25, 0.75]])


# ----------------------------------------------------------------------------------- infer
@pytest.mark.slow  # trains a LeNet-5 for a few seconds
def test_infer_classifies_image_files_with_the_manifest_labels(
    mosquitto, agents, key_file, trained, tmp_path, images, digits
):
    from PIL import Image

    agent = agents(agent_config(mosquitto.url, key_file, tmp_path / "s", artifact=str(trained)))
    paths, truth = images
    _, test = digits
    npy_float, npy_pixels, jpeg = tmp_path / "f.npy", tmp_path / "p.npy", tmp_path / "big.jpg"
    np.save(npy_float, test.x[0])
    np.save(npy_pixels, _pixels(test, 1))
    big = Image.fromarray(_pixels(test, 2)).resize((96, 96), Image.Resampling.NEAREST)
    big.convert("RGB").save(jpeg, quality=95)
    connection = flags(mosquitto.url, key_file)

    result = fleet_cli(
        "infer",
        "pi-01",
        *map(str, paths),
        str(npy_float),
        str(npy_pixels),
        str(jpeg),
        "--json",
        *connection,
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert (document["device"], document["model"], document["version"]) == ("pi-01", "digits", "1")
    assert document["latency_ms"] > 0 and document["round_trip_ms"] >= document["latency_ms"]
    rows = document["results"]
    assert [row["image"] for row in rows] == [str(p) for p in [*paths, npy_float, npy_pixels, jpeg]]
    right = sum(row["label"] == LABELS[y] for row, y in zip(rows, truth, strict=False))
    assert right >= COUNT - 2, rows
    assert all(
        LABELS[row["class"]] == row["label"] and 0.1 < row["probability"] <= 1 for row in rows
    )
    # the same digits as arrays and as a big RGB JPEG: the same answers as their PNGs
    assert [row["class"] for row in rows[COUNT:]] == [rows[i]["class"] for i in range(3)]
    assert len(agent.serving.latencies) == 1  # one batch

    table = fleet_cli("infer", "pi-01", str(paths[0]), str(paths[1]), *connection)
    assert table.exit_code == 0, table.output
    assert LABELS[truth[0]] in table.stdout and "test1.png" in table.stdout
    assert "ms" in table.stdout and "one batch of 2" in table.stdout


def test_a_bad_image_is_named_and_nothing_is_sent(
    mosquitto, agents, key_file, trained, tmp_path, images
):
    agent = agents(agent_config(mosquitto.url, key_file, tmp_path / "s", artifact=str(trained)))
    paths, _ = images
    connection = flags(mosquitto.url, key_file)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((3, 32, 32), np.float32))
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [
        (tmp_path / "missing.png", "image {} does not exist"),
        (text, "cannot read image {}"),
        (wide, "{} holds a float32 array of shape (3, 32, 32)"),
        (pickled, "cannot read {} as a numpy array"),
        (tmp_path, "{} is a folder; name the image files in it"),
    ]
    for bad, message in cases:
        result = fleet_cli("infer", "pi-01", str(paths[0]), str(bad), *connection)
        assert result.exit_code == 1
        assert message.format(bad) in one_line(result.output)
    assert len(agent.serving.latencies) == 0  # no batch reached the device
    # the file is checked before the broker is: the image, not the broker, is named
    url = f"mqtt://127.0.0.1:{free_port()}"
    result = fleet_cli("infer", "pi-01", str(tmp_path / "gone.png"), *flags(url, key_file))
    assert result.exit_code == 1 and "gone.png" in one_line(result.output)


def test_infer_on_a_device_without_a_model(mosquitto, agents, key_file, tmp_path, images):
    agents(agent_config(mosquitto.url, key_file, tmp_path / "s"))
    result = fleet_cli("infer", "pi-01", str(images[0][0]), *flags(mosquitto.url, key_file))
    assert result.exit_code == 1
    assert "pi-01 serves no model yet" in one_line(result.output)


# ------------------------------------------------------------------------------------ logs
def test_logs_returns_what_the_agent_logged(
    mosquitto, agents, key_file, artifact, tmp_path, caplog
):
    caplog.set_level(logging.INFO)  # the daemon lets INFO through; a test process must ask
    agents(agent_config(mosquitto.url, key_file, tmp_path / "s", artifact=str(artifact)))
    connection = flags(mosquitto.url, key_file)
    result = fleet_cli("logs", "pi-01", "--json", *connection)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["device"] == "pi-01"
    assert any("INFO bitfleet.agent: serving digits 1" in line for line in document["lines"])

    plain = fleet_cli("logs", "pi-01", *connection)
    assert plain.exit_code == 0 and "serving digits 1" in plain.stdout
    assert plain.stdout.splitlines() == document["lines"][-len(plain.stdout.splitlines()) :]
    two = fleet_cli("logs", "pi-01", "--lines", "2", "--json", *connection)
    assert len(json.loads(two.stdout)["lines"]) == 2
    for bad in ("0", "1001", "many"):
        result = fleet_cli("logs", "pi-01", "--lines", bad, *connection)
        assert result.exit_code != 0 and "--lines" in result.output


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("command", ["logs", "infer"])
def test_bad_targets_are_one_line(
    command, mosquitto, fleet, agents, key_file, artifact, tmp_path, images
):
    extra = [str(images[0][0])] if command == "infer" else []
    connection = flags(mosquitto.url, key_file)

    def run(device: str, *more: str):
        return fleet_cli(command, device, *extra, *more, *connection)

    assert "no device has announced itself on fleet lab" in one_line(run("pi-01").output)
    agent = agents(agent_config(mosquitto.url, key_file, tmp_path / "s", artifact=str(artifact)))
    result = run("pi-07")
    assert result.exit_code == 1
    line = one_line(result.output)
    assert "no device pi-07" in line and "known: pi-01" in line
    result = run("pi/01")
    assert result.exit_code == 1 and "invalid device id" in one_line(result.output)

    ghost(fleet, "pi-09")  # says it is online, never answers
    started = time.monotonic()
    result = run("pi-09", "--timeout", "1")
    assert time.monotonic() - started < 8
    assert result.exit_code == 1 and "did not answer" in one_line(result.output)

    agent.shutdown()
    result = run("pi-01")
    assert result.exit_code == 1 and "pi-01 is offline" in one_line(result.output)

    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"w" * 32)
    result = fleet_cli(command, "pi-01", *extra, *flags(mosquitto.url, wrong))
    assert result.exit_code == 1
    line = one_line(result.output)
    assert (
        "no device accepted the command" in line
        and "key may be wrong" in line
        and str(wrong) in line
    )

    if command == "infer":
        return  # the broker is reached the same way (_fleet.connect); 5 s is enough once
    url = f"mqtt://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = fleet_cli(command, "pi-01", *extra, *flags(url, key_file))
    assert time.monotonic() - started < 10
    assert result.exit_code == 1 and url in one_line(result.output)


def test_an_agent_that_predates_these_commands_is_named(
    mosquitto, agents, key_file, artifact, tmp_path, images, monkeypatch
):
    """An older agent answers logs/metrics with "unknown command" and no manifest in status."""
    from edge_agent.commands import Handler

    agent = agents(agent_config(mosquitto.url, key_file, tmp_path / "s", artifact=str(artifact)))
    handlers = agent.commands._handlers
    old_status = handlers["status"]
    monkeypatch.delitem(handlers, "logs")
    monkeypatch.delitem(handlers, "metrics")
    connection = flags(mosquitto.url, key_file)
    result = fleet_cli("logs", "pi-01", *connection)
    assert result.exit_code == 1
    assert "pi-01 refused logs: unknown command 'logs'" in one_line(result.output)
    result = fleet_cli("metrics", "--json", *connection)
    assert result.exit_code == 1
    assert "unknown command 'metrics'" in json.loads(result.stdout)["errors"]["pi-01"]

    without = {k: v for k, v in old_status.run({}).items() if k != "manifest"}
    monkeypatch.setitem(handlers, "status", Handler(lambda args: without))
    result = fleet_cli("infer", "pi-01", str(images[0][0]), *connection)
    assert result.exit_code == 1
    line = one_line(result.output)
    assert "does not say what input its model takes" in line and "update it" in line


def test_infer_warns_when_the_model_changes_during_the_request(
    mosquitto, agents, key_file, artifact, tmp_path, images, monkeypatch
):
    from edge_agent.commands import Handler

    agent = agents(agent_config(mosquitto.url, key_file, tmp_path / "s", artifact=str(artifact)))
    handlers = agent.commands._handlers
    old_status = handlers["status"]  # reports version 0: a deploy lands before the batch does
    monkeypatch.setitem(
        handlers, "status", Handler(lambda args: {**old_status.run(args), "version": "0"})
    )
    result = fleet_cli(
        "infer", "pi-01", str(images[0][0]), "--json", *flags(mosquitto.url, key_file)
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["version"] == "1"
    assert "pi-01 switched to digits 1 during the request" in result.stderr
