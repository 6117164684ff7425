"""The data-free study script: runs, resumes and summarises (tiny budgets)."""

import json

from benchmarks import autorecon_study
from models import checkpoint
from toolkit.train import TrainConfig, train


def test_the_study_runs_resumes_and_summarises(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    config = TrainConfig(
        model="resnet18", model_args={"width": 0.125, "stem": "imagenet"}, epochs=1
    )
    train(config, teacher, progress=False)
    out = tmp_path / "study.jsonl"
    argv = [
        "run",
        "--teacher",
        str(teacher),
        "--out",
        str(out),
        "--students",
        "int4",
        "--sources",
        "real",
        "gdfq",
        "--seeds",
        "0",
        "--steps",
        "2",
        "--generator-steps",
        "2",
    ]
    assert autorecon_study.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["student"], r["source"], r["seed"]) for r in rows] == [
        ("int4", "real", 0),
        ("int4", "gdfq", 0),
    ]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert checkpoint.load(teacher).meta["dataset"] == "digits"
    assert autorecon_study.main(argv) == 0  # everything done: nothing appended
    assert len(out.read_text().splitlines()) == 2
    capsys.readouterr()
    assert autorecon_study.main(["summary", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| teacher | int4 | real | 1 |" in table and "| teacher | int4 | gdfq | 1 |" in table
