"""Whatever a user types, `bitfleet` answers with one line, never a traceback.

Two halves: text holding ``[...]`` (paths, model names, labels) prints literally, never read as
rich markup; and a sweep of every command with bad input (missing paths, files instead of
folders, bad names, empty strings, out-of-range and malformed numbers) that each end in exit
code != 0, one ``error:`` or ``Usage:`` line, and no traceback without ``--debug``.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import models
from models.registry import ModelEntry
from toolkit.cli import app
from toolkit.simulate import SimulationConfig, default_topology

runner = CliRunner()


def invoke(*args: str):
    # wide enough that one-line messages with long temporary paths are not wrapped
    return runner.invoke(app, list(args), env={"COLUMNS": "400"})


def squash(text: str) -> str:
    """``text`` without whitespace and table borders: what survives any wrapping."""
    return re.sub(r"[\s\u2500-\u257f]", "", text)


def assert_literal(result, *texts: str) -> None:
    assert result.exit_code == 0, result.output
    for text in texts:
        assert squash(text) in squash(result.output), (text, result.output)


def assert_refused(result, *fragments: str) -> None:
    """Exit code != 0, one ``error:`` / ``Usage:`` line, no traceback; ``fragments`` named."""
    output = result.output
    assert result.exit_code != 0, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in output, output
    heads = [line for line in output.splitlines() if line.startswith(("error", "Usage"))]
    assert len(heads) == 1, output
    if result.exit_code == 1:  # the CLI's own errors: that line is all there is
        assert len(output.strip().splitlines()) == 1, output
    for fragment in fragments:
        assert squash(fragment) in squash(output), (fragment, output)


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> dict[str, Any]:
    """A tiny MNIST under ``[MNIST]/raw`` and a 1-epoch LeNet-5 run under ``[red]runs[/red]x``."""
    root = tmp_path_factory.mktemp("bad")
    data = root / "d" / "[MNIST]" / "raw"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 96), ("t10k", 32)):
        (data / f"{prefix}-images-idx3-ubyte").write_bytes(
            _idx(rng.integers(0, 256, (count, 28, 28)))
        )
        (data / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, count)))
    # "[red]" would be eaten as a style, "[/red]" alone is a closing tag rich cannot match
    run = root / "[red]runs[" / "red]x"
    result = invoke(
        "train",
        "--model",
        "lenet5",
        "--dataset",
        "mnist",
        "--data-root",
        str(data),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--out",
        str(run),
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    file = root / "a-file.txt"
    file.write_text("not a folder\n")
    return {
        "root": root,
        "data": data,
        "run": run,
        "file": file,
        "missing": root / "missing",
        "train_output": result.output,
    }


# --------------------------------------------------------------------------- literal brackets


def test_train_prints_a_bracketed_out_dir(place):
    assert squash(f"run written to {place['run']}") in squash(place["train_output"])


def test_eval_and_info_print_bracketed_paths(place):
    run = place["run"]
    assert_literal(invoke("eval", str(run)), f"{run}: accuracy", "on mnist/test (32 images)")
    assert_literal(invoke("info", str(run)), str(run), "lenet5")


def test_export_and_inspect_print_bracketed_paths(place):
    out = place["root"] / "[art]y[/i]"
    result = invoke("export", str(place["run"]), "--out", str(out))
    assert_literal(result, f"wrote {out} (onnx")
    assert_literal(invoke("inspect", str(out)), str(out), "checksums verified")
    document = json.loads(invoke("inspect", str(out), "--json").stdout)
    assert document["artifact"] == str(out)


def test_bracketed_model_names_print_literally(monkeypatch):
    name = "[red]x"
    entry = ModelEntry(name, "[b]fam", models.model_entry("lenet5").factory, "closes [/bold] early")
    monkeypatch.setitem(models.registry._REGISTRY, name, entry)
    assert_literal(invoke("models"), name, "[b]fam", "closes [/bold] early")
    assert_literal(invoke("ops", name, "--in-channels", "1"), f"{name} at 1x32x32")


def test_a_model_pattern_that_matches_nothing_says_so():
    assert_refused(invoke("models", "[red]x"), "no registered model matches '[red]x'")


def test_simulate_prints_a_bracketed_out_dir(place):
    out = place["root"] / "[sim]z"
    result = invoke(
        "simulate",
        "--nodes",
        "2",
        "--rounds",
        "1",
        "--local-steps",
        "1",
        "--batch-size",
        "8",
        "--no-progress",
        "--out",
        str(out),
    )
    assert_literal(result, f"written to {out}", "2 nodes, full")


# --------------------------------------------------------------------------- small trials


@pytest.mark.parametrize(
    ("nodes", "expected"), [(2, "full"), (3, "full"), (6, "full"), (9, "full"), (10, "rrg:8")]
)
def test_the_default_topology_fits_the_node_count(nodes, expected):
    assert default_topology(nodes) == expected
    assert SimulationConfig(nodes=nodes).topology == expected
    assert SimulationConfig().topology == "rrg:8"  # 50 nodes, as before


def test_simulate_six_nodes_with_the_default_topology():
    result = invoke(
        "simulate", "--nodes", "6", "--rounds", "1", "--local-steps", "1", "--no-progress"
    )
    assert_literal(result, "6 nodes, full", "vc")
    assert "auto" in squash(invoke("simulate", "--help").output)


def test_a_bad_data_spec_is_reported_before_the_topology():
    with pytest.raises(ValueError, match="bad partition 'weird'"):
        SimulationConfig(nodes=5, topology="rrg:9", data="weird")
    assert_refused(invoke("simulate", "--nodes", "6", "--data", "weird"), "bad partition 'weird'")
    # one node gossips with nobody: said at once (FedAvg with one node is fine)
    with pytest.raises(ValueError, match="at least 2 nodes"):
        SimulationConfig(nodes=1)
    assert SimulationConfig(nodes=1, merge="fedavg").topology == "full"


# --------------------------------------------------------------------------- the sweep

# Every numeric flag of every command: (command and its positional, flag, bad values). Values
# are out of range (0, negative, above a maximum) or not numbers at all.
# Each command comes with flags that keep it small, should a check be missing.
OPS = ("ops", "lenet5")
TRAIN = ("train", "--model", "lenet5", "--epochs", "1", "--no-progress")
BENCH = ("bench", "lenet5", "--repeats", "1", "--warmup", "0")
SIMULATE = ("simulate", "--nodes", "4", "--topology", "ring", "--rounds", "1", "--local-steps", "1")

NUMERIC = [
    (OPS, "--input-size", ["0", "-1", "abc"]),
    (OPS, "--in-channels", ["0", "x"]),
    (OPS, "--num-classes", ["0", ""]),
    (TRAIN, "--epochs", ["0", "-1", "abc"]),
    (TRAIN, "--batch-size", ["0", "1.5"]),
    (TRAIN, "--lr", ["0", "-1", "nan", "abc"]),
    (TRAIN, "--weight-decay", ["-1", "inf"]),
    (TRAIN, "--seed", ["-1", "x"]),
    (TRAIN, "--channels", ["0", "2", "4"]),
    (TRAIN, "--image-size", ["0", "-8", "1e9", "5000"]),
    (TRAIN, "--width", ["0", "-1"]),
    (TRAIN, "--kd-alpha", ["-0.1", "1.5"]),
    (TRAIN, "--kd-temperature", ["0", "-1"]),
    (TRAIN, "--threads", ["0", "two"]),
    (("eval", "RUN"), "--batch-size", ["0", "abc"]),
    (BENCH, "--input-size", ["0", "-5"]),
    (BENCH, "--threads", ["0", "1,x", "abc", "", "-1", "1,,2"]),
    (BENCH, "--batch", ["0", "abc"]),
    (BENCH, "--repeats", ["0", "abc"]),
    (BENCH, "--warmup", ["-1"]),
    (("export", "RUN"), "--input-shape", ["0,28,28", "1,28", "abc", "", "1,-2,3", "1,28,28,"]),
    (SIMULATE, "--nodes", ["0", "-1", "abc"]),
    (SIMULATE, "--rounds", ["0"]),
    (SIMULATE, "--seed", ["-1"]),
    (SIMULATE, "--local-steps", ["0"]),
    (SIMULATE, "--batch-size", ["0"]),
    (SIMULATE, "--lr", ["0", "-1", "nan"]),
    (SIMULATE, "--self-weight", ["-0.1", "1"]),
    (SIMULATE, "--peers", ["-1"]),
    (SIMULATE, "--trigger", ["0", "abc", ""]),
    (SIMULATE, "--drop", ["-0.1", "1"]),
    (SIMULATE, "--churn", ["1", "abc"]),
    (SIMULATE, "--delay", ["-1"]),
    (SIMULATE, "--target", ["-0.1", "1.5"]),
    (SIMULATE, "--workers", ["0"]),
    (SIMULATE, "--width", ["0"]),
]

NUMERIC_CASES = [
    pytest.param(command, flag, value, id=f"{command[0]}{flag}={value}")
    for command, flag, values in NUMERIC
    for value in values
]


def _fill(place: dict[str, Any], args: tuple[str, ...]) -> list[str]:
    names = {"RUN": "run", "FILE": "file", "MISSING": "missing", "DATA": "data", "ROOT": "root"}
    filled = []
    for arg in args:
        for key, name in names.items():
            arg = arg.replace(key, str(place[name]))
        filled.append(arg)
    return filled


@pytest.mark.parametrize(("command", "flag", "value"), NUMERIC_CASES)
def test_numeric_flags_are_checked_and_named(place, command, flag, value):
    assert_refused(invoke(*_fill(place, command), flag, value), flag)


# Other input a user can get wrong, with a fragment the one line must hold.
BAD = [
    # models / ops
    (("models", ""), "no registered model matches"),
    (("ops", "birael18"), "unknown model 'birael18'"),
    (("ops", "[red]x"), "unknown model '[red]x'"),
    (("ops", ""), "unknown model ''"),
    (("ops", "bireal18", "--stem", "foo"), "unknown stem 'foo'"),
    (("ops", "lenet5", "--stem", "cifar"), "stem"),
    # train
    (("train", "--model", ""), "unknown model ''"),
    (("train", "--model", "lenet5", "--dataset", ""), "unknown dataset ''"),
    (("train", "--model", "lenet5", "--dataset", "[red]x"), "unknown dataset '[red]x'"),
    (("train", "--model", "lenet5", "--optimizer", ""), "unknown optimizer ''"),
    (("train", "--model", "lenet5", "--schedule", "step"), "unknown schedule 'step'"),
    (("train", "--model", "lenet5", "--out", "FILE"), "FILE"),
    (
        ("train", "--model", "lenet5", "--dataset", "mnist", "--data-root", "d/[MNIST]/raw"),
        "d/[MNIST]/raw does not exist",
    ),
    (("train", "--model", "lenet5", "--dataset", "mnist", "--data-root", "FILE"), "not a folder"),
    (("train", "--model", "lenet5", "--dataset", "mnist"), "--data-root"),
    (("train", "--model", "lenet5", "--teacher", "MISSING"), "does not exist"),
    (("train", "--model", "lenet5", "--teacher", "FILE"), "not a directory"),
    (("train", "--model", "bireal18", "--stem", "foo"), "unknown stem 'foo'"),
    (("train", "--model", "lenet5", "--resume"), "resume"),
    (("train", "--model", "lenet5", "--resume", "--out", "MISSING"), "resume"),
    # eval / info
    (("eval", "MISSING/[red]x"), "MISSING/[red]x does not exist"),
    (("eval", "FILE"), "not a directory"),
    (("eval", "ROOT"), "spec.json"),
    (("eval", "RUN", "--split", "val"), "unknown split 'val'"),
    (("eval", "RUN", "--split", ""), "unknown split ''"),
    (("eval", "RUN", "--dataset", "svhn"), "unknown dataset 'svhn'"),
    (("eval", "RUN", "--dataset", "cifar10"), "--data-root"),
    (("eval", "RUN", "--data-root", "FILE"), "not a folder"),
    (("info", "MISSING"), "does not exist"),
    (("info", "FILE"), "not a directory"),
    (("info", "ROOT"), "spec.json"),
    # export / inspect
    (("export", "MISSING"), "does not exist"),
    (("export", "FILE"), "not a directory"),
    (("export", "RUN", "--format", ""), "unknown format ''"),
    (("export", "RUN", "--format", "coreml"), "unknown format 'coreml'"),
    (("export", "RUN", "--out", "FILE"), "already exists"),
    (("export", "RUN", "--out", "FILE", "--overwrite"), "not an artifact"),
    (("export", "RUN", "--out", "RUN", "--overwrite"), "checkpoint"),
    (("export", "RUN", "--out", "ROOT", "--overwrite"), "checkpoint"),
    (("export", "RUN", "--input-shape", "3,28,28"), "1-channel"),
    (("export", "RUN", "--input-shape", "1,8,8"), "28x28"),
    (("export", "RUN", "--input-shape", "1,8,8", "--allow-resize"), "28x28"),
    (("export", "RUN", "--name", ""), "artifact name"),
    (("export", "RUN", "--name", "[red]x"), "artifact name '[red]x'"),
    (("export", "RUN", "--version", "1/2"), "artifact version '1/2'"),
    (("inspect", "MISSING"), "does not exist"),
    (("inspect", "FILE"), "neither an artifact"),
    (("inspect", "RUN"), "manifest.json"),
    # bench
    (("bench", "nosuch"), "unknown model 'nosuch'"),
    (("bench", ""), "MODEL is empty"),
    (("bench", "FILE"), "not a directory"),
    (("bench", "RUN", "--input-size", "64"), "--input-size 64: lenet5 is built for 28x28"),
    (("bench", "lenet5", "--stem", "cifar"), "drop --stem"),
    # simulate: every error before any work, so before a progress bar is drawn
    (("simulate", "--nodes", "6", "--data", "weird"), "bad partition 'weird'"),
    (("simulate", "--nodes", "6", "--data", ""), "bad partition ''"),
    (("simulate", "--topology", ""), "unknown topology ''"),
    (("simulate", "--topology", "rrg:x"), "unknown topology 'rrg:x'"),
    (("simulate", "--nodes", "5", "--topology", "rrg:9"), "rrg:9"),
    (("simulate", "--merge", ""), "unknown merge method ''"),
    (("simulate", "--codec", "zip"), "unknown codec 'zip'"),
    (("simulate", "--variance", "foo"), "unknown variance mode 'foo'"),
    (("simulate", "--optimizer", "rmsprop"), "unknown optimizer 'rmsprop'"),
    (("simulate", "--init", "random"), "unknown init 'random'"),
    (("simulate", "--model", "nosuch"), "unknown model 'nosuch'"),
    (("simulate", "--dataset", "svhn"), "unknown dataset 'svhn'"),
    (("simulate", "--dataset", "cifar10"), "--data-root"),
    (("simulate", "--dataset", "mnist", "--data-root", "MISSING"), "does not exist"),
    (("simulate", "--model", "bireal18", "--stem", "foo"), "unknown stem 'foo'"),
    (("simulate", "--stem", "cifar"), "stem"),
    (("simulate", "--nodes", "4", "--topology", "ring", "--trigger", "3"), "trigger"),
    (("simulate", "--nodes", "4", "--rounds", "1", "--out", "FILE"), "FILE"),
]


@pytest.mark.parametrize(
    ("args", "fragment"), [pytest.param(a, f, id=" ".join(a)[:60]) for a, f in BAD]
)
def test_bad_input_is_one_line(place, args, fragment):
    (fragment,) = _fill(place, (fragment,))
    result = invoke(*_fill(place, args))
    assert_refused(result, fragment)
    assert result.exit_code == 1, result.output


def test_refused_export_leaves_the_checkpoint_intact(place):
    run = place["run"]
    assert_refused(invoke("export", str(run), "--out", str(run), "--overwrite"), "checkpoint")
    assert (run / "spec.json").is_file() and (run / "model.safetensors").is_file()
    assert place["file"].read_text() == "not a folder\n"
