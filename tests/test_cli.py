"""The `bitfleet` CLI through typer's CliRunner: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from toolkit.cli import app


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    # typer's CliRunner mixes stderr into result.output (and keeps result.stderr apart)
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(app, list(args))


def json_of(result) -> object:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 1, a single ``error: ...`` line naming ``fragments``, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = result.output.strip()
    assert "Traceback" not in text
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


# --------------------------------------------------------------------------- models / ops


def test_no_args_shows_help(runner):
    result = runner.invoke(app, [])
    for command in ("models", "ops", "train", "eval", "info"):
        assert command in result.output


def test_models_json(runner):
    rows = json_of(invoke(runner, "models", "--json"))
    assert isinstance(rows, list)
    by_name = {row["name"]: row for row in rows}
    assert {"bireal18", "lenet5"} <= set(by_name)
    for row in rows:
        assert {"name", "params", "family"} <= set(row)
        assert isinstance(row["params"], int) and row["params"] > 0
    assert by_name["lenet5"]["family"] == "lenet"
    assert by_name["lenet5"]["params"] == 61_706
    assert by_name["lenet5"]["binary"] is False
    assert by_name["bireal18"]["family"] == "resnet"
    assert by_name["bireal18"]["binary"] is True


def test_models_filter_and_table(runner):
    rows = json_of(invoke(runner, "models", "bireal*", "--json"))
    assert [row["name"] for row in rows] == ["bireal18", "bireal34"]
    table = invoke(runner, "models")
    assert table.exit_code == 0
    assert "bireal18" in table.output and "lenet5" in table.output


def test_ops_bireal18_imagenet_json(runner):
    result = json_of(
        invoke(runner, "ops", "bireal18", "--stem", "imagenet", "--input-size", "224", "--json")
    )
    assert result["input_shape"] == [1, 3, 224, 224]
    assert 11e6 < result["params"] < 12.5e6
    assert abs(result["flops"] - 1.39e8) / 1.39e8 < 0.05
    assert abs(result["bops"] - 1.68e9) / 1.68e9 < 0.05
    assert abs(result["ops"] - 1.63e8) / 1.63e8 < 0.05


def test_ops_lenet5_table(runner):
    result = invoke(runner, "ops", "lenet5", "--in-channels", "1")
    assert result.exit_code == 0, result.output
    assert "flops" in result.output and "416.52k" in result.output


def test_ops_lenet5_has_no_stem(runner):
    assert_one_line_error(invoke(runner, "ops", "lenet5", "--stem", "imagenet"), "stem")


def test_ops_unknown_model(runner):
    assert_one_line_error(invoke(runner, "ops", "birael18"), "birael18", "bitfleet models")


# --------------------------------------------------------------------------- train / eval / info


@pytest.fixture(scope="module")
def run_dir(runner, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = invoke(
        runner,
        "train",
        "--model",
        "lenet5",
        "--dataset",
        "digits",
        "--epochs",
        "2",
        "--seed",
        "0",
        "--lr",
        "3e-3",
        "--out",
        str(out),
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and str(out) in result.output
    return out


def test_train_writes_a_run(run_dir):
    assert (run_dir / "model.safetensors").is_file()
    assert (run_dir / "spec.json").is_file()
    assert len(json.loads((run_dir / "history.json").read_text())) == 2


def test_eval_json_matches_history(runner, run_dir):
    document = json_of(invoke(runner, "eval", str(run_dir), "--json"))
    history = json.loads((run_dir / "history.json").read_text())
    assert document["dataset"] == "digits" and document["split"] == "test"
    assert 0.0 <= document["accuracy"] <= 1.0
    assert document["accuracy"] == pytest.approx(history[-1]["test_accuracy"])
    assert document["samples"] == 450


def test_eval_explicit_dataset_and_split(runner, run_dir):
    test = json_of(invoke(runner, "eval", str(run_dir), "--dataset", "digits", "--json"))
    history = json.loads((run_dir / "history.json").read_text())
    assert test["accuracy"] == pytest.approx(history[-1]["test_accuracy"])
    train = json_of(
        invoke(runner, "eval", str(run_dir), "--dataset", "digits", "--split", "train", "--json")
    )
    assert train["samples"] == 1347


def test_eval_plain_output(runner, run_dir):
    result = invoke(runner, "eval", str(run_dir))
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "digits/test" in result.output


def test_info(runner, run_dir):
    document = json_of(invoke(runner, "info", str(run_dir), "--json"))
    assert document["model"]["name"] == "lenet5"
    assert document["meta"]["dataset"] == "digits"
    assert document["meta"]["epoch"] == 2
    assert "history" not in document["meta"]
    assert document["has_optimizer"] is False
    assert {"model.safetensors", "spec.json"} <= set(document["files"])
    assert document["params"] == 61_706
    assert document["flops"] == 416_520 and document["bops"] == 0
    table = invoke(runner, "info", str(run_dir))
    assert table.exit_code == 0, table.output
    assert "lenet5" in table.output and "digits" in table.output


def test_train_into_existing_run(runner, run_dir):
    result = invoke(
        runner,
        "train",
        "--model",
        "lenet5",
        "--epochs",
        "1",
        "--out",
        str(run_dir),
        "--no-progress",
    )
    assert_one_line_error(result, "--resume")


def test_train_json(runner, tmp_path):
    result = invoke(
        runner,
        "train",
        "--model",
        "lenet5",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "r"),
        "--json",
    )
    summary = json_of(result)
    assert summary["model"] == "lenet5" and summary["epochs"] == 1
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert len(summary["history"]) == 1


# --------------------------------------------------------------------------- bad input


def test_train_unknown_model(runner, tmp_path):
    result = invoke(
        runner,
        "train",
        "--model",
        "lenet6",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
    )
    assert_one_line_error(result, "lenet6", "bitfleet models")
    assert not (tmp_path / "r" / "spec.json").exists()


def test_train_unknown_dataset(runner, tmp_path):
    result = invoke(
        runner,
        "train",
        "--model",
        "lenet5",
        "--dataset",
        "svhn",
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
    )
    assert_one_line_error(result, "svhn", "digits")


def test_train_cifar10_needs_data_root(runner, tmp_path):
    result = invoke(
        runner,
        "train",
        "--model",
        "lenet5",
        "--dataset",
        "cifar10",
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
    )
    assert_one_line_error(result, "cifar10", "root")
    missing = invoke(
        runner,
        "train",
        "--model",
        "lenet5",
        "--dataset",
        "cifar10",
        "--data-root",
        str(tmp_path / "nowhere"),
        "--no-progress",
    )
    assert_one_line_error(missing, "does not exist")


def test_train_bad_optimizer(runner):
    assert_one_line_error(
        invoke(runner, "train", "--model", "lenet5", "--optimizer", "rmsprop", "--no-progress"),
        "rmsprop",
    )


@pytest.mark.parametrize("command", ["eval", "info"])
def test_missing_checkpoint_dir(runner, tmp_path, command):
    missing = tmp_path / "nope"
    assert_one_line_error(invoke(runner, command, str(missing)), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(invoke(runner, command, str(empty)), "spec.json")


def test_debug_reraises(runner):
    import models

    result = invoke(runner, "--debug", "ops", "birael18")
    assert result.exit_code != 0
    assert isinstance(result.exception, models.UnknownModelError)
    # and the flag does not stick to the next invocation
    assert_one_line_error(invoke(runner, "ops", "birael18"), "birael18")


# ------------------------------------------------------------------------- simulate --preset

TINY = ("simulate", "--nodes", "4", "--topology", "ring", "--rounds", "1", "--no-progress")


def _config_of(runner: CliRunner, out, *args: str) -> dict:
    result = invoke(runner, *TINY, "--json", "--out", str(out), *args)
    json_of(result)
    return json.loads((out / "vc.json").read_text())["config"]


def test_simulate_preset_paper_sets_what_it_says(runner, tmp_path):
    config = _config_of(runner, tmp_path, "--preset", "paper")
    assert {k: config[k] for k in PAPER} == PAPER
    # the fleet, graph and rounds asked for on the command line are kept
    assert (config["nodes"], config["topology"], config["rounds"]) == (4, "ring", 1)


PAPER = {
    "local_steps": 1,
    "batch_size": 64,
    "data": "dirichlet-pool:0.5",
    "self_weight": 0.5,
    "optimizer": "sgd",
    "lr": 0.01,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 5e-4,
    "weight_init": "xavier",
    "fedavg_weights": "equal",
    "augment": True,
    "test_subset": "balanced",
    "vc_rule": "bitfleet",
}


def test_simulate_explicit_flags_beat_the_preset(runner, tmp_path):
    config = _config_of(
        runner,
        tmp_path,
        "--preset", "paper", "--local-steps", "2", "--batch-size", "16", "--data", "iid",
        "--self-weight", "0.25", "--lr", "0.05", "--momentum", "0", "--nesterov",
        "--weight-decay", "0", "--weight-init", "default", "--fedavg-weights", "samples",
        "--no-augment", "--test-subset", "balanced:10", "--vc-rule", "dfl2",
    )  # fmt: skip
    assert {k: config[k] for k in PAPER} == {
        **PAPER,
        "local_steps": 2,
        "batch_size": 16,
        "data": "iid",
        "self_weight": 0.25,
        "lr": 0.05,
        "momentum": 0.0,
        "nesterov": True,
        "weight_decay": 0.0,
        "weight_init": "default",
        "fedavg_weights": "samples",
        "augment": False,
        "test_subset": "balanced:10",
        "vc_rule": "dfl2",
    }


def test_simulate_without_a_preset_keeps_the_defaults(runner, tmp_path):
    from toolkit.simulate import SimulationConfig

    config = _config_of(runner, tmp_path)
    defaults = SimulationConfig()
    for name in PAPER:
        assert config[name] == getattr(defaults, name), name
    assert config["local_steps"] == 20 and config["data"] == "dirichlet:0.5"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--preset", "fedprox"), "unknown preset 'fedprox'; use one of paper"),
        (("--vc-rule", "foo"), "unknown rescaling rule 'foo'; use one of bitfleet, dfl2"),
        (("--data", "dirichlet-pool:-1"), "bad partition 'dirichlet-pool:-1': alpha must be"),
        (("--weight-init", "he"), "unknown weight init 'he'"),
        (("--test-subset", "half"), "bad test subset 'half'"),
        (("--fedavg-weights", "size"), "unknown fedavg weighting 'size'"),
    ],
)
def test_simulate_bad_settings_are_one_line(runner, args, fragment):
    assert_one_line_error(invoke(runner, *TINY, *args), fragment)


def test_simulate_table_shows_the_curve_metrics(runner):
    result = runner.invoke(
        app, [*TINY, "--merge", "fedavg", "--local-steps", "1"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    for text in ("rounds to 50/80/90/95% of ref", "AUC", "reference accuracy (FedAvg's final)"):
        assert text in result.output, result.output


def test_simulate_eval_every_evaluates_every_n_rounds_and_the_last(runner, tmp_path):
    result = invoke(
        runner, *TINY[:-3], "--rounds", "5", "--eval-every", "2", "--local-steps", "1",
        "--no-progress", "--json", "--out", str(tmp_path),
    )  # fmt: skip
    json_of(result)
    history = json.loads((tmp_path / "vc.json").read_text())["history"]
    assert [record["round"] for record in history] == [0, 2, 4, 5]
    bad = runner.invoke(app, [*TINY, "--eval-every", "0"])
    assert bad.exit_code == 2 and "--eval-every" in bad.output  # click's usage error
